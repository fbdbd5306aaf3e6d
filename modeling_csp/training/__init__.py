"""Training weight-sparse models (`train`): the project's own default model is trained with it."""
