"""Print pip constraints from grail_megatron/versions.toml (no third-party imports).

The Makefile feeds the output to `pip install -c`, so the setup installs exactly the
version matrix; tests/test_versions.py checks the container against the same file.
"""
import pathlib
import sys
import tomllib

MATRIX = pathlib.Path(__file__).resolve().parent.parent / "grail_megatron" / "versions.toml"


def main() -> None:
    pins = tomllib.loads(MATRIX.read_text())["pypi"]
    sys.stdout.write("".join(f"{name}=={version}\n" for name, version in pins.items()))


if __name__ == "__main__":
    main()
