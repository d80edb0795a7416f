"""
`flashsloth serve`: an OpenAI-compatible HTTP server for FlashSloth checkpoints (FastAPI + uvicorn, the `serve`
extra) that batches concurrent requests into one `generate` call, with a small web page to ask about an image.

`protocol` checks requests and turns them into messages, images and generation settings; `batching` runs the model
in a worker thread and batches what arrives together; `app` is the FastAPI application; `cli` adds the `serve` and
`serve-bench` commands; `load_test` is the load test behind `serve-bench`. See docs/serving.md.
"""
