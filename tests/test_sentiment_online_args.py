"""`python -m experiments.sentiment_online` takes its overrides anywhere on the line, as its docs write them."""

from pathlib import Path

import pytest

from experiments.sentiment_online import build_parser, parse_arguments


@pytest.mark.parametrize("argv", [
    ["grpo", "--output-dir", "runs/x", "loss.minibatch_groups=true", "train.total_steps=2"],  # the documented order
    ["grpo", "loss.minibatch_groups=true", "--output-dir", "runs/x", "train.total_steps=2"],
    ["grpo", "loss.minibatch_groups=true", "train.total_steps=2", "--output-dir", "runs/x"],
])
def test_overrides_before_between_or_after_the_options(argv):
    args = parse_arguments(argv)
    assert args.method == "grpo" and args.output_dir == Path("runs/x")
    assert args.overrides == ["loss.minibatch_groups=true", "train.total_steps=2"]


def test_plain_parse_args_refuses_the_documented_order():
    """Why parse_arguments parses intermixed: argparse binds the empty overrides to the method's position."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["grpo", "--output-dir", "runs/x", "train.total_steps=2"])
