# Download a Llama-family checkpoint from the Hugging Face Hub and convert it:
#   python scripts/download.py --repo_id meta-llama/Llama-2-7b-hf [--hf_token T]
# The Hugging Face files land in OUT (default checkpoints/<repo_id>) and are converted in place:
# then generate.py --checkpoint_path OUT reads them.
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `from scripts...` as a script

from scripts.convert_hf_checkpoint import convert

ALLOW_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.model",
                  "original/tokenizer.model"]
# Mistral repos also ship Meta-format consolidated weights: as large again, and unused here
IGNORE_PATTERNS = ["consolidated*.safetensors"]


def download(repo_id: str, hf_token: Optional[str] = None, out_dir: Optional[str] = None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError("huggingface_hub is not installed; pip install huggingface_hub") from None
    out = Path(out_dir) if out_dir is not None else Path("checkpoints") / repo_id
    print(f"downloading {repo_id} to {out}")
    try:
        snapshot_download(repo_id, local_dir=out, allow_patterns=ALLOW_PATTERNS,
                          ignore_patterns=IGNORE_PATTERNS, token=hf_token)
    except (OSError, ValueError) as e:  # what huggingface_hub raises for network, auth and name errors
        reason = " ".join(str(e).split())  # its messages span several lines; the CLI prints one
        raise OSError(f"could not download {repo_id} (no network, offline mode, no such repo, or a gated "
                      f"repo without access / --hf_token): {type(e).__name__}: {reason}") from None
    return convert(out)


def main(repo_id: str, hf_token: Optional[str], out_dir: Optional[str]):
    path = download(repo_id, hf_token, out_dir)
    print(f"ready: python generate.py --checkpoint_path {path.parent}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Download a Hugging Face Llama checkpoint and convert it.")
    parser.add_argument("--repo_id", required=True, help="e.g. meta-llama/Llama-2-7b-hf")
    parser.add_argument("--hf_token", default=None, help="for gated repos (default: the cached login, if any)")
    parser.add_argument("--out_dir", default=None, help="default: checkpoints/<repo_id>")
    try:
        main(**vars(parser.parse_args()))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
