"""The Gradio app over the explorer: `main` serves it (the repository's and a Space's `app.py` call it).

Needs the `[app]` extra (gradio, plotly); the model, conversion and the circuit library do not.
"""
