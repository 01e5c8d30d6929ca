"""`lorakit serve`: an OpenAI-compatible server over one base model and many adapters, batched together.

    request -> adapter (or tree node, or the base) -> a row of the running batch -> tokens -> text

Nothing is imported here, so the `lorakit` command and `lorakit info` (lorakit.serve.vllm) work without the
serve extra; the server itself is lorakit.serve.server.build_server, the batching engine lorakit.serve.engine.
"""
