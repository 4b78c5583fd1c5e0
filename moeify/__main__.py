"""`python -m moeify` runs the command line."""

from moeify.cli import main

if __name__ == "__main__":
    main(prog_name="moeify")
