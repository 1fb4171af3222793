"""The local Gradio demo (`bash run_gradio.sh`); see docs/demo.md."""
