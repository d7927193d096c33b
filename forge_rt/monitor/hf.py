"""`ForgeMemoryCallback`: MemoryMap for a transformers `Trainer`.

    trainer = Trainer(..., callbacks=[ForgeMemoryCallback()])   # -> <output_dir>/memory.jsonl

Trainer has no hook between forward and backward, so the callback puts forward hooks on the model:
the model's forward starting marks "forward" (or "eval" when the model is in eval mode) and returning
marks "backward". Optimizer, evaluation and checkpoint phases come from the Trainer's own events.
"""
from __future__ import annotations

from transformers import TrainerCallback

from forge_rt.monitor.sampler import MemoryMonitor


class ForgeMemoryCallback(TrainerCallback):
    """Pass a `monitor` to control it yourself (it is started if needed and stopped at train end only
    if this callback started it); otherwise one is made writing `<args.output_dir>/memory.jsonl`."""

    def __init__(self, monitor: MemoryMonitor | None = None, **monitor_kwargs):
        self.monitor = monitor
        self._kwargs = monitor_kwargs
        self._owned = False
        self._hooks: list = []
        self._phase: str | None = None
        self._step = 0

    def _mark(self, phase: str) -> None:
        if phase != self._phase:
            self._phase = phase
            self.monitor.mark(phase, self._step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.monitor is None:
            self.monitor = MemoryMonitor(out_path=args.output_dir, **self._kwargs)
        if self.monitor._state == "new":
            self.monitor.start()
            self._owned = True
        if model is not None:
            self._hooks = [model.register_forward_pre_hook(self._before_forward),
                           model.register_forward_hook(self._after_forward)]

    def _before_forward(self, module, args):
        self._mark("forward" if module.training else "eval")

    def _after_forward(self, module, args, output):
        if module.training:
            self._mark("backward")

    def on_step_begin(self, args, state, control, **kwargs):
        self._step = state.global_step + 1  # the step now running, counted from 1

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._mark("optimizer")

    def on_step_end(self, args, state, control, **kwargs):
        # Trainer evaluates, then saves, right after this event when these flags are set.
        self._mark("eval" if control.should_evaluate else "checkpoint" if control.should_save else "idle")

    def on_evaluate(self, args, state, control, **kwargs):
        self._mark("checkpoint" if control.should_save else "idle")

    def on_save(self, args, state, control, **kwargs):
        self._mark("idle")

    def on_train_end(self, args, state, control, **kwargs):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._owned:
            self.monitor.stop()
