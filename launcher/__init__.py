"""What starts and stops a deployment from outside the models: the tritonserver process, the OpenAI
proxy, their supervisor and cleanup, and `python -m launcher.serve`. Code that runs inside the Triton
models lives in `vlmserve`, which never imports this package or `export`."""
