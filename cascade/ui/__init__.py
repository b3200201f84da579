"""`cascade ui`: a local Gradio app over the CLI (train, watch, sample, compare SR, browse runs)."""
