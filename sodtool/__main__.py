"""`python -m sodtool`. A Ctrl-C while the CLI's modules import is one line and exit code 130,
as it is afterwards (`sodtool.cli.main`).

`run` can also serve as the console script's entry point (`sodtool = "sodtool.__main__:run"`):
with `sodtool.cli:main`, the generated script imports the CLI before any of its code runs, so a
Ctrl-C in those first tens of milliseconds is Python's traceback."""

import sys


def catch_lost_interrupts() -> None:
    """A Ctrl-C whose KeyboardInterrupt is raised inside a finaliser (a `__del__`, a weakref
    callback) would be printed as "Exception ignored in ..." and lost, the command going on:
    say nothing, and deliver it to the main thread again a moment later, once out of the
    finaliser (from another thread: in this one it would be raised inside this hook)."""
    import _thread
    import threading

    default = sys.unraisablehook

    def hook(unraisable) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            again = threading.Timer(0.01, _thread.interrupt_main)
            again.daemon = True
            again.start()
            return
        default(unraisable)

    sys.unraisablehook = hook


def run() -> None:
    catch_lost_interrupts()
    try:
        from sodtool.cli import main

        main()  # says a Ctrl-C itself, but for one that lands before its first line
    except KeyboardInterrupt:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.stderr.write("sodtool: interrupted\n")
        sys.stderr.flush()
        try:  # as sodtool.cli._interrupted: exit 130, not CPython's SIGINT exit after `python -m`
            import ctypes

            ctypes.c_int.in_dll(ctypes.pythonapi, "_Py_UnhandledKeyboardInterrupt").value = 0
        except (AttributeError, ValueError, OSError):
            pass
        sys.exit(130)


if __name__ == "__main__":
    run()
