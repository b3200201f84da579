"""stages: train and run one stage of the IF cascade. Never loads the text encoder, never chains stages."""
