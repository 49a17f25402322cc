"""Pretrain a MAMO-style model with the vlfast ops (not yet built: issue 6)."""
import sys

if __name__ == "__main__":
    sys.exit("train.py: not yet. The MAMO model and trainer land with issue 6; today vlfast ships the "
             "ops in vlfast.ops (see README).")
