"""Benchmark output: every line to stdout and, with a path, to a results file."""


class Report:
    def __init__(self, path: str | None):
        self.file = open(path, "w") if path else None

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()
