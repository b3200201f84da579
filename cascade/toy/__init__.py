"""A small procedural world in which a two-stage cascade in the IF architecture really learns
(16 px base, 16 -> 64 px super-resolution), its attribute readers, and its pretrained weights."""
