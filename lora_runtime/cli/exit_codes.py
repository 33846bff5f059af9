"""Exit statuses of the `lora-runtime` command, in one place."""

EXIT_OK = 0
EXIT_FAILED = 1  # an unexpected error (a bug): the traceback is shown
EXIT_USAGE = 2  # bad input: one paragraph on stderr, nothing changed on disk
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT); the run saved what it had
EXIT_TERMINATED = 143  # SIGTERM (128 + 15), e.g. from a scheduler or torchrun; saved as for Ctrl-C
EXIT_SIGNALLED = {"SIGINT": EXIT_INTERRUPTED, "SIGTERM": EXIT_TERMINATED}
