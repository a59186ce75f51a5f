"""Exact per-example gradient norms of a whole network at the cost of about one forward and one backward.

    norms = per_example_grad_norms(model, inputs, targets, loss="ce")      # (B,)
    with GradNormPlan(model) as plan:                                      # hooks installed once
        for x, y in batches:
            norms = plan(x, y)                                             # per_example_grad_norms reuses it too

How:
  1. A plan finds the layers once per model (a rule per module holding trainable parameters) and installs one
     forward hook per layer for as long as it is open; the hooks do nothing outside the plan's own calls.
  2. Per call the hooks keep each layer's input and attach a tensor hook to its output. Parameters keep their
     requires_grad flags: the backward is `autograd.grad` of the loss w.r.t. the outputs of the entry layers
     (those whose inputs need no gradient; every layer's with a torch.func fallback in the model), taken as
     graph edges at forward time, so autograd computes the activation gradients only: no weight-gradient
     GEMM runs and no .grad is touched.
  3. The loss is the SUM of per-example losses: examples are independent (eval-mode semantics), so the
     gradient of the sum w.r.t. a layer's output holds each example's own output gradient. The internal loss
     skips kd_loss's host-side label check (a bad label gives that example a NaN norm).
  4. Each tensor hook receives its output's gradient during the backward (before any in-place op that later
     rewrote the output, as autograd guarantees for hooks registered earlier), applies the layer's rule,
     which adds the per-example squared norms into one (B,) buffer (kernels add into it directly), and frees
     the input. Nothing in the path synchronises with the host.
The squared norms of all parameters add up to the squared norm of the whole gradient.
With cuda_graph=True the plan captures forward, loss and backward in a CUDA graph per input shape and
replays it (fixed shapes; the host then only copies the batch in).

Parameters that module code uses directly (class tokens, positional embeddings, layer scales, relative
position bias tables, a child's weight passed to F.linear) and tied parameters (one parameter used by several
modules) go through uses.py: each use captured in the forward, each example's gradient reduced at the use and
summed over the uses, so cross terms between uses are exact.

Refused with an explanation, since no rule sees the needed quantities: BatchNorm using batch statistics;
a module called twice in one forward; a layer whose output is not batch-first (e.g. positional embeddings of
arange(T) shared by the batch); a parameter used in an op that mixes the examples; an input modified in place
after the layer consumed it.
"""
from __future__ import annotations

import functools
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.nn.modules.batchnorm import _BatchNorm

from kdfast.runtime.dispatch import resolve_backend
from kdfast.errors import BackendUnavailableError, InvalidArgumentError, UnsupportedModuleError
from kdfast.grad_norms import rules  # noqa: F401  (registers the built-in rules)
from kdfast.grad_norms.fallback import fallback_sqnorms, log_fallback_once, per_example_grads
from kdfast.grad_norms.registry import BATCH_DIMS, CHILDREN, SAVERS, Rule, Sink, find_rule, takes_kwargs, takes_sink
from kdfast.grad_norms.uses import UseTracker, chain_to_params, linear_use_sqnorms, per_example_derived_grads

LOSSES = ("ce", "kd")
ON_MISSING = ("error", "fallback")
BACKENDS = (None, "triton", "torch", "cpp")


@dataclass
class _Layer:
    name: str
    module: nn.Module
    rule: Rule | None                  # None: the torch.func fallback
    want: tuple[str, ...]              # own parameters requiring grad, in registration order
    want_set: frozenset = frozenset()
    sink_rule: bool = False            # the rule adds into a Sink (else it returns a dict)
    save: object = None                # the rule's forward-time saver
    save_kwargs: bool = False          # the saver takes the call's keyword arguments
    inner: list = field(default_factory=list)  # fallback only: indices of the layers nested in this module
    params: dict = field(default_factory=dict)  # own (and covered children's) parameter name -> parameter


def _trainable_modules(model: nn.Module):
    for name, module in model.named_modules():
        want = tuple(n for n, p in module.named_parameters(recurse=False) if p.requires_grad)
        if want:
            yield name, module, want


def _covered_children(model: nn.Module) -> set[str]:
    """Names of the modules whose parameters an enclosing module's rule covers (its `children`)."""
    covered = set()
    for name, module in model.named_modules():
        rule = find_rule(module)
        for child in CHILDREN.get(rule, ()) if rule is not None else ():
            covered.add(f"{name}.{child}" if name else child)
    return covered


def check(model: nn.Module, *example_inputs) -> dict[str, str]:
    """{module name: class name} of the modules whose trainable parameters nothing covers (empty: all covered).

    A module without a rule of its own is covered when every use of its parameters is an op the use capture
    handles (uses.py); that shows only in a forward: pass example inputs to run one (no backward) and list the
    modules whose parameters were used in an op that mixes examples or not at all. Without inputs, the rules
    alone are checked and modules without one are assumed capturable.
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"check: model must be an nn.Module, got {type(model).__name__}")
    if not example_inputs:
        return {}
    plan = GradNormPlan(model)
    if not plan.track_uses:  # every parameter in a rule layer
        return {}
    with plan:
        batch = example_inputs[0].shape[0]
        call = _Call(plan, plan.layers, "torch", batch, torch.zeros(batch), False)
        plan._call = call
        try:
            with torch.enable_grad(), call.tracker:
                model(*example_inputs)
        finally:
            plan._call = None
    seen = set(call.tracker.count) | set(call.tracker.bad)
    missing = {pid for pid in plan.names if pid not in seen or pid in call.tracker.bad}
    return {owner or "<model>": type(model.get_submodule(owner)).__name__
            for owner in dict.fromkeys(plan.owner[pid] for pid in plan.names if pid in missing)}


def _coupled_batchnorms(batchnorms) -> list[str]:
    return [name or "<model>" for name, m in batchnorms if m.training or m.running_mean is None]


def _refuse_coupled(coupled):
    raise InvalidArgumentError(
        f"per_example_grad_norms: BatchNorm normalises with batch statistics at {', '.join(coupled)} (train "
        "mode or track_running_stats=False), which couples the examples of a batch, so per-example "
        "gradients are not defined; call model.eval() to use the running statistics")


def _find_layers(model: nn.Module, on_missing: str) -> list[_Layer]:
    """The rule layers, and with on_missing="fallback" the modules without a rule (their parameters go through
    the use capture; torch.func takes over a module whose parameters it cannot handle)."""
    covered = _covered_children(model)
    layers = []
    for name, module, want in _trainable_modules(model):
        if name in covered:
            continue
        rule = find_rule(module)
        params = {pn: getattr(module, pn) for pn in want}
        for child in CHILDREN.get(rule, ()) if rule is not None else ():
            params.update({f"{child}.{pn}": p for pn, p in module.get_submodule(child).named_parameters()
                           if p.requires_grad})
        if rule is None and on_missing != "fallback":
            continue
        save = SAVERS.get(rule)
        layers.append(_Layer(name, module, rule, tuple(params), frozenset(params),
                             rule is not None and takes_sink(rule), save, save is not None and takes_kwargs(save),
                             params=params))
    for outer in layers:
        if outer.rule is None:
            prefix = f"{outer.name}." if outer.name else ""
            outer.inner = [i for i, layer in enumerate(layers) if layer is not outer and layer.name.startswith(prefix)]
    return layers


def _is_float_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


class _TapOutputs(torch.autograd.Function):
    """Identity on the tensor outputs of a fallback module with several outputs, whose backward hands all
    their gradients to the layer at once (zeros for unused ones). Returns copies: outputs of a custom
    Function that alias its inputs may not be modified in place afterwards."""

    @staticmethod
    def forward(ctx, on_grads, *tensors):
        ctx.on_grads = on_grads
        return tuple(t.clone() for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.on_grads(grads)
        return (None, *grads)


class _Call:
    """One call's state: saved inputs per layer, the graph edges to differentiate, the sinks, the use capture."""

    def __init__(self, plan, layers, backend, batch_size, total, per_layer):
        n = len(layers)
        self.backend, self.B, self.total = backend, batch_size, total
        device = total.device.type
        # rules choose their own accumulation dtype: autocast off in the backward hooks where it is on
        self.no_autocast = (functools.partial(torch.autocast, device, enabled=False)
                            if torch.is_autocast_enabled(device) else nullcontext)
        self.args, self.kwargs, self.versions, self.saved = [None] * n, [None] * n, [()] * n, [None] * n
        self.slots = [None] * n  # modules with several outputs: positions of the tensor outputs
        self.calls, self.edges, self.replaying = [0] * n, [], False
        # per parameter (by id): its (B,) buffer, and the summed per-example gradients of its captured uses
        self.buffers = ({pid: torch.zeros_like(total) for pid in plan.names} if per_layer else None)
        self.acc: dict[int, torch.Tensor] = {}
        self.fallback_params: set[int] = set()
        if per_layer:
            self.sinks = [Sink(per_param={pn: self.buffers[id(p)] for pn, p in layer.params.items()})
                          for layer in layers]
        else:
            self.sinks = [Sink(total)] * n
        self.tracker = (UseTracker(plan.param_of, plan.buffer_ids, batch_size,
                                   functools.partial(plan._on_use, self)) if plan.track_uses else nullcontext())

    def buffer(self, pid: int) -> torch.Tensor:
        return self.total if self.buffers is None else self.buffers[pid]

    def uses(self, pid: int) -> int:
        return self.tracker.count.get(pid, 0) if isinstance(self.tracker, UseTracker) else 1

    def accumulate(self, pid: int, grads: torch.Tensor) -> None:
        previous = self.acc.get(pid)
        self.acc[pid] = grads if previous is None else previous + grads

    def finish(self) -> None:
        """Squared norms of the parameters whose per-example gradients were summed over their uses."""
        for pid, grads in self.acc.items():
            self.buffer(pid).add_(grads.reshape(len(grads), -1).square().sum(1).to(self.total.dtype))  # 0-d params too
        self.acc = {}


class GradNormPlan:
    """Per-example gradient norms of one model, with its hooks installed once: a context manager.

        with GradNormPlan(model) as plan:
            norms = plan(inputs, targets)             # as per_example_grad_norms(model, inputs, targets)

    While it is open, per_example_grad_norms(model, ...) with the same on_missing and backend runs through
    it (not through a cuda_graph plan, which only its own calls use). On exit (or release()) the hooks go
    and the model is exactly as before: parameters, flags, .grad, modes. cuda_graph=True captures each new
    (shape, dtype) once in a CUDA graph and replays it (CUDA tensors only; the loss and layers must not
    synchronise or change shapes between calls).
    """

    def __init__(self, model, *, on_missing="error", backend=None, cuda_graph=False):
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(f"GradNormPlan: model must be an nn.Module, got {type(model).__name__}")
        if on_missing not in ON_MISSING:
            raise InvalidArgumentError(f"per_example_grad_norms: on_missing must be one of {ON_MISSING}, got "
                                       f"{on_missing!r}")
        if backend not in BACKENDS:
            raise InvalidArgumentError(f"per_example_grad_norms: backend must be one of {BACKENDS}, got {backend!r}")
        if not isinstance(cuda_graph, bool):
            raise InvalidArgumentError(f"GradNormPlan: cuda_graph must be a bool, got {cuda_graph!r}")
        self.model, self.on_missing, self.backend, self.cuda_graph = model, on_missing, backend, cuda_graph
        self._batchnorms = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
        coupled = _coupled_batchnorms(self._batchnorms)
        if coupled:
            _refuse_coupled(coupled)
        self.layers = _find_layers(model, on_missing)
        self._every_edge = any(layer.rule is None for layer in self.layers)
        # every trainable parameter once (tied ones under their first name), and who owns it
        self.param_of = {id(p): p for p in model.parameters() if p.requires_grad}
        self.names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        self.owner = {pid: n.rpartition(".")[0] for pid, n in self.names.items()}
        self.buffer_ids = {id(b) for b in model.buffers()}
        in_rules = [id(p) for layer in self.layers if layer.rule is not None for p in layer.params.values()]
        # uses are captured where some parameter is outside every rule or tied (a TorchFunctionMode costs
        # Python time per op, so models fully covered by rules run without it)
        self.track_uses = len(in_rules) != len(set(in_rules)) or set(in_rules) != set(self.param_of)
        self._params = list(model.parameters())
        self._flags = [p.requires_grad for p in self._params]
        self._handles, self._call, self._graphs, self._open, self._outer = [], None, {}, False, None

    # ------------------------------------------------------------------------------------- lifetime
    def __enter__(self):
        if self._open:
            raise InvalidArgumentError("GradNormPlan: this plan is open already; open it once")
        self._open = True
        try:
            for index, layer in enumerate(self.layers):
                hook = functools.partial(self._on_forward, index)
                if self.track_uses and layer.rule is not None:
                    self._handles.append(layer.module.register_forward_pre_hook(
                        functools.partial(self._on_forward_pre, index)))
                self._handles.append(layer.module.register_forward_hook(hook, with_kwargs=True))
        except BaseException:
            self.release()
            raise
        if not self.cuda_graph:  # a graph plan replays fixed shapes: only explicit calls go through it
            self._outer = _OPEN.get(self.model)  # a plan opened earlier is back in use when this one closes
            _OPEN[self.model] = self
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def release(self) -> None:
        """Removes the hooks and drops captured graphs; the plan can be opened again."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._call, self._graphs, self._open = [], None, {}, False
        if _OPEN.get(self.model) is self:
            if self._outer is not None and self._outer._open:
                _OPEN[self.model] = self._outer
            else:
                del _OPEN[self.model]
        self._outer = None

    # ------------------------------------------------------------------------------------- hooks
    def _on_forward_pre(self, index, module, args):
        """Inside a rule layer's forward its rule sees its parameters' uses: the use capture skips them."""
        call = self._call
        if call is not None and not call.replaying:
            covered = call.tracker.covered
            for p in self.layers[index].params.values():
                covered[id(p)] = covered.get(id(p), 0) + 1
        return None

    def _on_forward(self, index, module, args, kwargs, output):
        call = self._call
        if call is None or call.replaying:  # not our call, or the fallback re-running a module
            return None
        layer = self.layers[index]
        if layer.rule is None and not self._take_over(call, index):
            return None
        if layer.rule is not None and isinstance(call.tracker, UseTracker):
            tracker = call.tracker
            for p in layer.params.values():
                left = tracker.covered.get(id(p), 1) - 1
                if left:
                    tracker.covered[id(p)] = left
                else:
                    tracker.covered.pop(id(p), None)
                tracker.count[id(p)] = tracker.count.get(id(p), 0) + 1
        call.calls[index] += 1
        if call.calls[index] > 1:
            raise UnsupportedModuleError(
                f"per_example_grad_norms: `{layer.name}` ({type(module).__name__}) ran more than once in one "
                "forward; the per-example gradient of a reused module sums its calls, whose cross terms no rule "
                "computes; give each use its own module")
        if layer.rule is not None and not (args and isinstance(args[0], torch.Tensor)):
            raise UnsupportedModuleError(
                f"per_example_grad_norms: `{layer.name}` ({type(module).__name__}) was called without a positional "
                "input tensor; its rule reads the first positional argument")
        several = type(output) in (tuple, list)
        tensors = [o for o in output if _is_float_tensor(o)] if several else [output]
        dims = [0] * len(tensors)
        if tensors and layer.rule in BATCH_DIMS:
            dims[0] = BATCH_DIMS[layer.rule](module)
        if not tensors or any(not isinstance(t, torch.Tensor) or t.dim() <= d or t.shape[d] != call.B
                              for t, d in zip(tensors, dims)):
            got = (tuple(output.shape) if isinstance(output, torch.Tensor)
                   else [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in output]
                   if type(output) in (tuple, list) else type(output).__name__)
            raise UnsupportedModuleError(
                f"per_example_grad_norms: `{layer.name}` ({type(module).__name__}) must return batch-first "
                f"tensors with {call.B} rows, got {got}; a layer applied to an input shared by the whole batch "
                "(e.g. positional embeddings of arange(T)) sums the examples' gradients before any rule sees "
                "them: feed it a batch-first input such as arange(T).expand(B, T)")
        tensors = [t for t in tensors if t.requires_grad]
        if not tensors:  # no trainable path reaches this output (its parameters went unused)
            return None
        # grad mode is off in the backward: rules build no graph on the inputs; torch.func re-runs on detached ones
        detach = layer.rule is None
        call.args[index] = tuple(a.detach() if detach and isinstance(a, torch.Tensor) else a for a in args)
        call.kwargs[index] = {k: v.detach() if detach and isinstance(v, torch.Tensor) else v
                              for k, v in kwargs.items()}
        call.versions[index] = tuple(a._version if isinstance(a, torch.Tensor) else None for a in args)
        if layer.save is not None:
            call.saved[index] = (layer.save(module, args, output, kwargs=kwargs) if layer.save_kwargs
                                 else layer.save(module, args, output))
        # The backward is taken w.r.t. the edges of the entry layers' outputs (before any later in-place op moves
        # them): every other rule layer's input depends on trainable parameters only through the outputs of
        # earlier layers or captured uses, so its output lies on a path to an entry. A fallback module may use
        # parameters in its own code (before a nested layer's input, say): with fallbacks, every output is
        # requested.
        if self._every_edge or not any(isinstance(a, torch.Tensor) and a.requires_grad
                                       for a in (*args, *kwargs.values())):
            call.edges.extend(get_gradient_edge(t) for t in tensors)
        on_grad = functools.partial(self._on_grad, call, index)
        if several:
            slots = tuple(i for i, o in enumerate(output) if _is_float_tensor(o))
            call.slots[index] = slots
            tapped = iter(_TapOutputs.apply(on_grad, *[output[i] for i in slots]))
            return type(output)(next(tapped) if i in slots else o for i, o in enumerate(output))
        output.register_hook(on_grad)
        return None

    def _take_over(self, call, index) -> bool:
        """A module without a rule whose parameters the use capture could not split: torch.func takes it over
        (with the layers nested in it that never ran their own forward). False where the capture suffices."""
        layer = self.layers[index]
        tracker = call.tracker
        pids = {id(p) for p in layer.params.values()}
        for inner in layer.inner:
            if call.calls[inner] == 0:
                pids.update(id(p) for p in self.layers[inner].params.values())
        if not isinstance(tracker, UseTracker) or not any(pid in tracker.bad for pid in pids):
            return False
        for pid in pids:
            tracker.bad.pop(pid, None)
        call.fallback_params |= pids
        log_fallback_once(layer.module)
        return True

    def _on_use(self, call, use, output):
        """A captured use (uses.py): its output's gradient reduces it per example in the backward."""
        output.register_hook(functools.partial(self._on_use_grad, call, use))
        call.edges.append(get_gradient_edge(output))

    def _on_use_grad(self, call, use, grad_output):
        if use.params <= call.fallback_params:
            return None
        with call.no_autocast():
            if use.linear and all(call.uses(pid) == 1 for pid in use.params):
                linear_use_sqnorms(use, grad_output, call.B, call.backend, call.buffer)
                return None
            grads = per_example_derived_grads(use, grad_output, call.B)
            for pid, g in chain_to_params(use, grads, self.param_of).items():
                if pid not in call.fallback_params:
                    call.accumulate(pid, g)
        return None

    def _on_grad(self, call, index, grad_output):
        layer, args = self.layers[index], call.args[index]
        if any(isinstance(a, torch.Tensor) and a._version != v for a, v in zip(args, call.versions[index])):
            raise UnsupportedModuleError(
                f"per_example_grad_norms: the input of `{layer.name}` ({type(layer.module).__name__}) was modified "
                "in place after the layer ran, so its saved value is gone; make the later operation out of place")
        with call.no_autocast():
            if layer.rule is None:
                self._fallback(call, index, grad_output)
            else:
                self._apply_rule(call, index, grad_output)
        call.args[index] = call.kwargs[index] = call.saved[index] = None
        return None

    def _apply_rule(self, call, index, grad_output):
        """The rule for parameters used here only; a parameter with other uses too (tied) gets its per-example
        gradient from torch.func on this module, summed with its other uses' (cross terms included)."""
        layer = self.layers[index]
        tied = [pn for pn, p in layer.params.items() if call.uses(id(p)) > 1]
        want = layer.want_set
        if tied:
            detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in call.args[index])
            kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in call.kwargs[index].items()}
            call.replaying = True
            try:
                grads = per_example_grads(layer.module, detached, kwargs, grad_output, call.slots[index], tuple(tied))
            finally:
                call.replaying = False
            for pn in tied:
                call.accumulate(id(layer.params[pn]), grads[pn])
            want = want - frozenset(tied)
            if not want:
                return
        if layer.sink_rule:
            layer.rule(layer.module, call.args[index][0], grad_output, want=want, backend=call.backend,
                       sink=call.sinks[index], saved=call.saved[index])
        else:
            self._dict_rule(call, index, grad_output, want)

    def _dict_rule(self, call, index, grad_output, want):
        layer = self.layers[index]
        sq = layer.rule(layer.module, call.args[index][0], grad_output, want=want, backend=call.backend)
        missing = [n for n in layer.want if n in want and n not in sq]
        if missing:
            raise UnsupportedModuleError(f"per_example_grad_norms: the rule for `{layer.name}` "
                                         f"({type(layer.module).__name__}) returned no norms for {missing}")
        for pn in layer.want:
            if pn in want:
                call.sinks[index].add(pn, sq[pn])

    def _fallback(self, call, index, grad_output):
        """torch.func on the module, covering also nested layers that never ran their own forward: their
        weights were used by this module's code directly (e.g. MultiheadAttention's out_proj)."""
        layer = self.layers[index]
        targets = {pn: (index, pn) for pn in layer.want}
        start = len(layer.name) + 1 if layer.name else 0
        for inner in layer.inner:
            if call.calls[inner] == 0 and self.layers[inner].rule is not None:
                targets.update({f"{self.layers[inner].name[start:]}.{pn}": (inner, pn)
                                for pn in self.layers[inner].want})
        call.replaying = True
        try:
            sq = fallback_sqnorms(layer.module, call.args[index], call.kwargs[index], grad_output, call.slots[index],
                                  tuple(targets))
        finally:
            call.replaying = False
        for name, (owner, pn) in targets.items():
            call.sinks[owner].add(pn, sq[name])

    # ------------------------------------------------------------------------------------- calls
    def _check_current(self, where):
        if not self._open:
            raise InvalidArgumentError(f"{where}: the plan is not open; use it as `with GradNormPlan(model) as "
                                       "plan:`")
        coupled = _coupled_batchnorms(self._batchnorms)
        if coupled:
            _refuse_coupled(coupled)
        flags = [p.requires_grad for p in self._params]
        if flags != self._flags:
            raise InvalidArgumentError(f"{where}: requires_grad of the model's parameters changed after the plan "
                                       "was made; make a new GradNormPlan")
        return any(p.dtype == torch.float64 for p in self._params)

    def __call__(self, inputs, targets, *, loss="ce", alpha=0.5, temperature=4.0, teacher_logits=None,
                 per_layer=False):
        """(B,) norms (and the per-parameter squared norms with per_layer=True): see per_example_grad_norms."""
        _check_args(self.model, inputs, targets, loss, teacher_logits, per_layer, self.on_missing)
        float64 = self._check_current("GradNormPlan")
        backend = _choose_backend(self.backend, inputs.device, float64)
        out_dtype = torch.float64 if float64 else torch.float32
        run = functools.partial(self._run, inputs, targets, loss, alpha, temperature, teacher_logits, per_layer,
                                backend, out_dtype)
        if not self.cuda_graph:
            return run()
        if inputs.device.type != "cuda":
            raise BackendUnavailableError(f"GradNormPlan: cuda_graph=True captures CUDA work; the inputs are on "
                                          f"{inputs.device.type}; pass cuda_graph=False")
        if per_layer:
            raise InvalidArgumentError("GradNormPlan: cuda_graph=True returns the total norms only; per_layer=True "
                                       "needs cuda_graph=False")
        return self._replay(inputs, targets, teacher_logits, loss, alpha, temperature, backend, out_dtype)

    def _run(self, inputs, targets, loss, alpha, temperature, teacher_logits, per_layer, backend, out_dtype):
        B = inputs.shape[0]
        total = torch.zeros(B, dtype=out_dtype, device=inputs.device)
        call = _Call(self, self.layers, backend, B, total, per_layer)
        if B and self.names:
            self._call = call
            try:
                with torch.enable_grad():
                    with call.tracker:
                        output = self.model(inputs.detach() if inputs.requires_grad else inputs)
                    self._refuse_mixed(call)
                    summed = _summed_loss(output, targets, loss, alpha, temperature, teacher_logits)
                    if call.edges and summed.requires_grad:
                        torch.autograd.grad(summed, call.edges, allow_unused=True)
                call.finish()
            finally:
                self._call = None
        if not per_layer:
            return total.clamp_(min=0).sqrt_()
        sq = {name: call.buffers[pid].clamp_(min=0) for pid, name in self.names.items()}
        if sq:
            torch.sum(torch.stack(list(sq.values())), 0, out=total)
        return total.sqrt(), sq

    def _refuse_mixed(self, call):
        """One error naming every module whose parameters were used in ops that mix the examples."""
        bad = getattr(call.tracker, "bad", None)
        if not bad:
            return
        modules = {}
        for pid, what in bad.items():
            owner = self.owner[pid]
            modules.setdefault(owner, (type(self.model.get_submodule(owner)).__name__, what))
        listed = "; ".join(f"`{n or '<model>'}` ({c}): {what}" for n, (c, what) in modules.items())
        raise UnsupportedModuleError(
            f"per_example_grad_norms: {len(modules)} module(s) use trainable parameters where no rule or use "
            f"capture can split them per example: {listed}; register a rule with kdfast.grad_norms.register_rule"
            + ("" if self.on_missing == "fallback" else " or pass on_missing='fallback'"))

    def _replay(self, inputs, targets, teacher_logits, loss, alpha, temperature, backend, out_dtype):
        """Captures forward + loss + backward for this input signature once, then replays the graph."""
        autocast = torch.is_autocast_enabled("cuda")
        key = (tuple(inputs.shape), inputs.dtype, tuple(targets.shape), targets.dtype, loss, alpha, temperature,
               autocast, torch.get_autocast_dtype("cuda") if autocast else None, teacher_logits is None)
        state = self._graphs.get(key)
        if state is None:
            static = [inputs.clone(), targets.clone(), None if teacher_logits is None else teacher_logits.clone()]
            # autocast's weight-cast cache must not outlive a capture (its tensors live in the graph's pool)
            ctx = (lambda: torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
                   if autocast else nullcontext())
            run = functools.partial(self._run, static[0], static[1], loss, alpha, temperature, static[2], False,
                                    backend, out_dtype)
            side = torch.cuda.Stream(inputs.device)
            side.wait_stream(torch.cuda.current_stream(inputs.device))
            with torch.cuda.stream(side), ctx():  # warm-up: Triton compilation, cuDNN choices, allocator
                run(), run()
            torch.cuda.current_stream(inputs.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), ctx():
                out = run()
            state = self._graphs[key] = (graph, static, out)
        graph, static, out = state
        static[0].copy_(inputs)
        static[1].copy_(targets)
        if teacher_logits is not None:
            static[2].copy_(teacher_logits)
        graph.replay()
        return out.clone()


# Plans currently open, by model: per_example_grad_norms(model, ...) runs through them.
_OPEN: "weakref.WeakKeyDictionary[nn.Module, GradNormPlan]" = weakref.WeakKeyDictionary()


def _check_args(model, inputs, targets, loss, teacher_logits, per_layer, on_missing):
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"per_example_grad_norms: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(inputs, torch.Tensor) or inputs.dim() == 0:
        got = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise InvalidArgumentError(f"per_example_grad_norms: inputs must be a batch-first tensor (B, ...), got {got}")
    if not isinstance(targets, torch.Tensor) or targets.dim() == 0 or targets.shape[0] != inputs.shape[0]:
        raise InvalidArgumentError(
            f"per_example_grad_norms: targets must be a tensor with one entry per example ({inputs.shape[0]}), got "
            f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}")
    if not (callable(loss) or loss in LOSSES):
        raise InvalidArgumentError(f"per_example_grad_norms: loss must be 'ce', 'kd' or a callable returning "
                                   f"per-example losses (B,), got {loss!r}")
    if loss == "kd" and teacher_logits is None:
        raise InvalidArgumentError("per_example_grad_norms: loss='kd' needs teacher_logits (B, C), got None")
    if on_missing not in ON_MISSING:
        raise InvalidArgumentError(f"per_example_grad_norms: on_missing must be one of {ON_MISSING}, got "
                                   f"{on_missing!r}")
    if not isinstance(per_layer, bool):
        raise InvalidArgumentError(f"per_example_grad_norms: per_layer must be a bool, got {per_layer!r}")


def _summed_loss(output, targets, loss, alpha, temperature, teacher_logits):
    """Sum over examples of their own losses (so d/d activation holds each example's own gradient)."""
    B = targets.shape[0]
    if callable(loss):
        per_example = loss(output, targets)
        if not isinstance(per_example, torch.Tensor) or tuple(per_example.shape) != (B,):
            got = tuple(per_example.shape) if isinstance(per_example, torch.Tensor) else type(per_example).__name__
            raise InvalidArgumentError(f"per_example_grad_norms: the loss callable must return per-example "
                                       f"losses of shape ({B},), got {got}")
        return per_example.sum()
    from kdfast.losses.kd_loss import kd_loss
    if not isinstance(output, torch.Tensor):
        raise InvalidArgumentError(f"per_example_grad_norms: loss={loss!r} needs the model to return logits "
                                   f"(B, ..., C), got {type(output).__name__}")
    # validate=False: no host-side label check (a synchronisation); a bad label makes that row's loss NaN
    if loss == "ce":
        return kd_loss(output, None, targets, alpha=0.0, reduction="sum", validate=False)
    return kd_loss(output, teacher_logits.detach(), targets, alpha=alpha, temperature=temperature,
                   reduction="sum", validate=False)


def _choose_backend(backend, device, float64):
    chosen = resolve_backend(backend, device, op="per_example_grad_norms")
    if chosen == "cpp":  # no C++ kernels here: on the CPU the rules are BLAS-bound batched torch already
        return "torch"
    if float64 and chosen == "triton":
        if backend is None:
            return "torch"  # float64 is the testing dtype: keep its precision
        raise BackendUnavailableError("per_example_grad_norms: backend='triton' computes in float32; a float64 "
                                      "model needs backend='torch'")
    return chosen


def per_example_grad_norms(model, inputs, targets, *, loss="ce", alpha=0.5, temperature=4.0, teacher_logits=None,
                           per_layer=False, on_missing="error", backend=None):
    """Exact L2 norm of each example's gradient w.r.t. every parameter with requires_grad.

    Args:
        model: the network; BatchNorm must be in eval mode (running statistics).
        inputs: (B, ...) batch-first input tensor.
        targets: (B,) class indices (or (B, ...) matching the logits' leading dims, summed per example).
            An index outside [0, C) gives that example a NaN norm (no host-side check: it would synchronise).
        loss: "ce", "kd" (kdfast.kd_loss with alpha, temperature and teacher_logits) or a callable
            (output, targets) -> (B,) per-example losses.
        per_layer: also return {parameter name: (B,) squared norms}; they sum to norms ** 2.
        on_missing: "error" (list every module without a rule) or "fallback" (torch.func for those modules).
        backend: "triton", "torch" or None (Triton for CUDA tensors; "cpp" runs the torch path).

    Runs through the model's open GradNormPlan when there is one with the same on_missing and backend (hooks
    installed once for many calls); otherwise installs the hooks for this call and removes them after.

    Returns:
        (B,) float32 norms (float64 when the model is float64), and the dict with per_layer=True.
    """
    _check_args(model, inputs, targets, loss, teacher_logits, per_layer, on_missing)
    kwargs = dict(loss=loss, alpha=alpha, temperature=temperature, teacher_logits=teacher_logits, per_layer=per_layer)
    plan = _OPEN.get(model)
    if plan is not None and plan.on_missing == on_missing and plan.backend == backend:
        return plan(inputs, targets, **kwargs)
    with GradNormPlan(model, on_missing=on_missing, backend=backend) as plan:
        return plan(inputs, targets, **kwargs)
