"""Image-text retrieval evaluation, fine-tuning and search (not yet built: issue 7)."""
import sys

if __name__ == "__main__":
    sys.exit("retrieve.py: not yet. Retrieval lands with issue 7, after the trainer (issue 6).")
