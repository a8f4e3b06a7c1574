"""Entry point for ``accelerate launch -m grpo_lab.train RECIPE [key=value ...]``.

Same arguments as ``grpo-lab train``: a YAML recipe, then dotted overrides such as
``trainer.lr=1e-6 output_dir=runs/x``. Run ``grpo-lab config --explain`` for every key.
A mistake the user can fix ends with one line on stderr and a non-zero exit code (``--debug`` or
``GRPO_LAB_DEBUG=1`` for the traceback); pass ``accelerate launch -q`` so the launcher does not
add its own traceback for the failed process.
"""

from grpo_lab.cli import main

if __name__ == "__main__":
    import sys

    argv = sys.argv[1:]
    debug = ["--debug"] if "--debug" in argv else []
    sys.exit(main([*debug, "train", *(a for a in argv if a != "--debug")]))
