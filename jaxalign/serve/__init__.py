"""Serving: ``jaxalign serve``, an OpenAI-compatible HTTP server with continuous batching and guided decoding.

- :mod:`~jaxalign.serve.protocol`: request validation and OpenAI's error object.
- :mod:`~jaxalign.serve.scheduler`: the thread that runs :class:`jaxalign.rollout.ContinuousEngine` for requests.
- :mod:`~jaxalign.serve.app`: the FastAPI app (``create_app``) and :class:`ServedModel`.
- :mod:`~jaxalign.serve.metrics`: Prometheus metrics.
- :mod:`~jaxalign.serve.command`: the ``jaxalign serve`` command.

See docs/serving.md.
"""
