"""Entry point for ``accelerate launch -m grpo_lab.train RECIPE [key=value ...]``.

Same arguments as ``grpo-lab train``: a YAML recipe, then dotted overrides such as
``trainer.lr=1e-6 output_dir=runs/x``. Run ``grpo-lab config --explain`` for every key.
"""

from grpo_lab.cli import main

if __name__ == "__main__":
    import sys

    sys.exit(main(["train", *sys.argv[1:]]))
