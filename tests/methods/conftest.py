"""The methods' tests share the train tests' session setup: XLA's persistent compilation cache (imported with
it) and the tiny saved checkpoint fixture."""

from tests.train.conftest import checkpoint  # noqa: F401 (a fixture, registered by importing it)
