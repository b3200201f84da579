"""The optimizers, one room: `factory` builds the one a config asks for (and steps it inside backward);
`low_precision` is our AdamW for bf16/fp16 weights (stochastic rounding, Kahan, 8-bit and bf16 states);
`beyond_adamw` holds Adafactor and Prodigy; `torchao_lowbit` wraps torchao's low-bit AdamW (the optional
extra [torchao]). Which of them composes with which engine: cascade/compat.py."""
