"""A task's environments in a child process, stepped while the parent runs the policy.

`task.overlap_envs: true` (`overlapped`): the environments are split into two halves; the
child steps one half while the parent's policy runs its forward on the other, so a rollout
costs about the larger of the two instead of their sum when a second core is free. The
child is forked once, with its own copy of every environment; the parent's copies (still
used by the scripted expert and for the example batch) go their own way, which is harmless
because every rollout resets its environments with explicit seeds. The child only steps
environments and pickles their observations back; torch is never called in it.

Observations, rewards and ends are exactly what the environments give in-process; the
policy draws its noise for the same rows in the same order as the in-process loop, so a
rollout differs from it only where a forward of half the rows rounds differently from one
of all of them.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import signal
import traceback
from collections.abc import Sequence
from typing import Any


def _serve(conn: Any, envs: Sequence[Any]) -> None:
    """The child's loop: `("reset", [(i, seed)])`, `("step", [(i, action)])` or
    `("step", [(i, action, end_now, seed)])` (`EnvWorker.step_async`), `("close",)`.

    Ctrl-C reaches the whole process group: the child ignores it, so that the parent's run
    finishes its step and saves (the parent stops the child); it ends when the parent closes
    it or goes away (end of the pipe), or on SIGTERM (multiprocessing's exit handler)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.redirect_stdout(io.StringIO()):  # minigrid prints while it generates levels
        while True:
            try:
                message = conn.recv()
            except EOFError:  # the parent is gone
                return
            try:
                if message[0] == "reset":
                    reply = [envs[i].reset(seed=int(seed))[0] for i, seed in message[1]]
                elif message[0] == "step":
                    reply = []
                    for i, action, *then in message[1]:  # then: (end now, seed of the next reset) or ()
                        obs, reward, terminated, truncated, _ = envs[i].step(int(action))
                        reset_obs = None
                        if then and (terminated or truncated or then[0]):
                            reset_obs = envs[i].reset(seed=int(then[1]))[0]
                        reply.append((obs, float(reward), bool(terminated), bool(truncated), reset_obs))
                else:
                    return
                conn.send(("ok", reply))
            except Exception as exc:  # noqa: BLE001 (any environment error goes back to the parent)
                conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


class EnvWorker:
    """The environments `envs` (copied into a forked child) behind a pipe.

    Args:
        envs: the environments (gymnasium `Env`s) the child steps; index `i` is `envs[i]`.
        name: the task's name, for error messages.
    """

    def __init__(self, envs: Sequence[Any], name: str) -> None:
        self.name = name
        ctx = mp.get_context("fork")  # the child starts with the parent's environments, none re-made
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, list(envs)), daemon=True, name="lora-runtime-envs")
        self._proc.start()
        child.close()
        self._waiting = False

    def reset(self, seeds: Sequence[tuple[int, int]]) -> list[Any]:
        """Resets environment `i` with `seed` for each pair; returns their observations."""
        self._conn.send(("reset", list(seeds)))
        return self._reply()

    def step_async(self, actions: Sequence[tuple]) -> None:
        """Starts stepping environment `i` with `action` for each `(i, action)`, or each
        `(i, action, end_now, seed)`: then an episode that ended (or `end_now`: a length
        limit the parent keeps) is reset with `seed` at once. `step_wait` collects."""
        self._conn.send(("step", list(actions)))
        self._waiting = True

    def step_wait(self) -> list[tuple[Any, float, bool, bool, Any]]:
        """`(observation, reward, terminated, truncated, observation after the reset or None)`
        of each environment `step_async` sent."""
        self._waiting = False
        return self._reply()

    def _reply(self) -> Any:
        try:
            status, reply = self._conn.recv()
        except (EOFError, OSError):
            raise RuntimeError(f"task {self.name!r}: the environment worker process ended unexpectedly "
                               f"(exit code {self._proc.exitcode}); set task.overlap_envs: false to step "
                               "the environments in-process") from None
        if status == "error":
            raise RuntimeError(f"task {self.name!r}: an environment failed in the worker process: {reply}")
        return reply

    @property
    def alive(self) -> bool:
        return self._proc.is_alive()

    def close(self) -> None:
        """Stops the child (idempotent)."""
        if self._proc.is_alive():
            with contextlib.suppress(OSError):
                if self._waiting:
                    self._conn.recv()
                self._conn.send(("close",))
            self._proc.join(timeout=5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        self._conn.close()
