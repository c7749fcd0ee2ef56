"""Programs as weights: a spec compiled once into a KV prefix, called like a function.

    prog = paw_mlx.compile("Label the sentiment: positive or negative.", out_dir="sent")
    f = paw_mlx.function("sent")
    f("I loved it")           # -> "positive"
    f(["meh", "great!"])      # one batch
"""

from paw_mlx.programs.artifact import ProgramArtifact, PromptLayout, read_artifact, write_artifact
from paw_mlx.programs.compile import compile
from paw_mlx.programs.function import ProgramFunction, function

__all__ = ["ProgramArtifact", "ProgramFunction", "PromptLayout", "compile", "function", "read_artifact",
           "write_artifact"]
