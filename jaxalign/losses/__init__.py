"""Pure, jittable alignment objectives: arrays in, (unreduced values, metrics) out."""

from jaxalign.losses.core import *  # noqa: F401,F403
