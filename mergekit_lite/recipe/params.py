"""Per-tensor parameter values for one step: defaults, per-model values, rules and gradients.

The engine asks `ParamResolver.for_tensor(name)` for every tensor (in every pass), so settings
are parsed once here and a lookup costs O(number of rules); parameters that cannot vary are
resolved once up front and results are cached by tensor name.

Precedence, per parameter and model, as in mergekit: the model's own setting
(`models[].parameters`), then the step's setting (for per-model parameters, a {model: value}
mapping entry or the shared value), then the method's default. A rule list that matches no
rule falls through to the next level.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, cast

from ..errors import RecipeError
from ..methods.registry import MethodSpec, Param
from .model import StepSpec
from .settings import Const, Setting, SettingError, is_rule_mapping, layer_position, parse_setting
from .stack import LayerStack

_CACHE_LIMIT = 1 << 16


def _coerce(p: Param, value: Any) -> Any:
    """Numbers reach methods as float for float parameters and int for int parameters."""
    if isinstance(value, bool) or value is None:
        return value
    if p.kind == "float" and isinstance(value, (int, float)):
        return float(value)
    if p.kind == "int" and isinstance(value, (int, float)):
        return int(value)
    return value


class ParamResolver:
    """Resolves every parameter of `spec` for each tensor of one step.

    `model_refs` is the step's model order (per-model parameters come back as tuples in that
    order). `num_layers` is needed only when a layer gradient is used on a layer tensor.
    """

    def __init__(self, spec: MethodSpec, step: StepSpec, model_refs: Sequence[str], num_layers: int | None,
                 position: Callable[[str], float] | None = None) -> None:
        self.spec = spec
        self.step_id = step.id
        self.model_refs = list(model_refs)
        self.num_layers = num_layers
        self._place = position  # a layer stack's own gradient positions (per slice)
        # For each parameter: one chain of settings per model (per_model) or a single chain.
        self._chains: dict[str, list[list[Setting]] | list[Setting]] = {}
        self._fixed: dict[str, Any] = {}
        self._varying: list[Param] = []
        self._cache: dict[str, dict[str, Any]] = {}
        self._order = [p.name for p in spec.params]

        step_params = self._canonical(step.parameters, "parameters")
        model_params = {ref: self._canonical(v, f"models[{ref}].parameters")
                        for ref, v in step.model_parameters.items()}
        for p in spec.params:
            chains = self._build(p, step_params.get(p.name), model_params)
            self._chains[p.name] = chains
            flat = [s for chain in chains for s in chain] if p.per_model else chains
            if all(isinstance(s, Const) for s in flat):  # type: ignore[union-attr]
                self._fixed[p.name] = self._resolve(p, "", lambda: 0.0)
            else:
                self._varying.append(p)
        if not self._varying:
            self._fixed = {n: self._fixed[n] for n in self._order}

    # -- construction -------------------------------------------------------------------------

    def _canonical(self, params: dict[str, Any], where: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in params.items():
            p = self.spec.param(name)
            if p is None:
                raise RecipeError(f"step '{self.step_id}': unknown parameter '{name}' for method "
                                  f"'{self.spec.name}' ({where})")
            out[p.name] = value
        return out

    def _parse(self, p: Param, value: Any) -> Setting:
        try:
            return parse_setting(value)
        except SettingError as exc:
            raise RecipeError(f"step '{self.step_id}': parameter '{p.name}': {exc}") from None

    def _build(self, p: Param, step_value: Any, model_params: dict[str, dict[str, Any]]) -> Any:
        per_model_map = isinstance(step_value, dict) and not is_rule_mapping(step_value)
        if per_model_map and not p.per_model:
            raise RecipeError(f"step '{self.step_id}': parameter '{p.name}' takes one value for all models")
        shared = None if step_value is None or per_model_map else self._parse(p, step_value)
        if p.per_model:
            chains: list[list[Setting]] = []
            for ref in self.model_refs:
                chain: list[Setting] = []
                own = model_params.get(ref, {}).get(p.name)
                if own is not None:
                    chain.append(self._parse(p, own))
                if per_model_map and ref in step_value:
                    chain.append(self._parse(p, step_value[ref]))
                elif shared is not None:
                    chain.append(shared)
                chains.append(chain)
            return chains
        chain = [self._parse(p, mp[p.name]) for ref in self.model_refs
                 if p.name in (mp := model_params.get(ref, {}))]
        if shared is not None:
            chain.append(shared)
        return chain

    # -- resolution ---------------------------------------------------------------------------

    def _value(self, p: Param, chain: list[Setting], name: str, t: Any, who: str) -> Any:
        for setting in chain:
            value = setting.evaluate(name, t)
            if value is not None:
                return _coerce(p, value)
        if p.required and p.default is None:
            raise RecipeError(f"step '{self.step_id}': parameter '{p.name}' has no value for tensor "
                              f"'{name}'{who} (no rule matches and there is no default)")
        return _coerce(p, p.default)

    def _resolve(self, p: Param, name: str, t: Any) -> Any:
        chains = self._chains[p.name]
        if p.per_model:  # one chain per model (see _build)
            return tuple(self._value(p, chain, name, t, f" (model '{ref}')")
                         for ref, chain in zip(self.model_refs, cast("list[list[Setting]]", chains), strict=True))
        return self._value(p, cast("list[Setting]", chains), name, t, "")

    def _position(self, name: str) -> float:
        try:
            return self._place(name) if self._place is not None else layer_position(name, self.num_layers)
        except ValueError as exc:
            raise RecipeError(f"step '{self.step_id}': a layer gradient cannot be placed for tensor "
                              f"'{name}': {exc}") from None

    def for_tensor(self, name: str) -> dict[str, Any]:
        """Every parameter of the method for tensor `name` (a fresh dict the caller may keep)."""
        if not self._varying:
            return dict(self._fixed)
        cached = self._cache.get(name)
        if cached is None:
            t_cache: list[float] = []

            def t() -> float:  # computed only when a gradient is reached
                if not t_cache:
                    t_cache.append(self._position(name))
                return t_cache[0]

            values = dict(self._fixed)
            for p in self._varying:
                values[p.name] = self._resolve(p, name, t)
            cached = {n: values[n] for n in self._order}
            if len(self._cache) < _CACHE_LIMIT:
                self._cache[name] = cached
        return dict(cached)

    def scalar_values(self) -> dict[str, Any]:
        """Parameters whose value is the same for every tensor (those that vary are left out).

        Use it for whole-run decisions (e.g. `MethodSpec.scope`): parameters declared
        `per_tensor=False` are always present here.
        """
        return dict(self._fixed)

    @property
    def varies_by_tensor(self) -> bool:
        return bool(self._varying)


class SlicedResolver:
    """A layer stack's parameters: each tensor takes its slice's values (`LayerStack.slice_index`),
    with layer gradients spread over that slice's layers, as mergekit resolves a slice's
    parameters. The same interface as `ParamResolver`."""

    def __init__(self, spec: MethodSpec, step: StepSpec, model_refs: Sequence[str], stack: LayerStack) -> None:
        if len(step.slices) != len(stack.slices):
            raise ValueError("one SliceParams per slice of the stack")
        self.spec = spec
        self.step_id = step.id
        self._stack = stack
        self._parts = [ParamResolver(spec, replace(step, parameters=sp.parameters, model_parameters=sp.model_parameters),
                                     model_refs, stack.num_layers, stack.position) for sp in step.slices]
        self._fixed = {name: value for name, value in self._parts[0].scalar_values().items()
                       if all(name in part.scalar_values() and part.scalar_values()[name] == value
                              for part in self._parts[1:])}
        for p in spec.params:
            if not p.per_tensor and p.name not in self._fixed:
                values = [part.scalar_values().get(p.name) for part in self._parts]
                k = next(k for k, v in enumerate(values) if v != values[0])
                raise RecipeError(f"step '{step.id}': parameter '{p.name}' of method '{spec.name}' is the same for "
                                  f"every tensor, but slices[0] gives {values[0]!r} and slices[{k}] {values[k]!r}")

    def for_tensor(self, name: str) -> dict[str, Any]:
        try:
            k = self._stack.slice_index(name)
        except ValueError as exc:
            raise RecipeError(f"step '{self.step_id}': tensor '{name}': {exc}") from None
        return self._parts[k].for_tensor(name)

    def scalar_values(self) -> dict[str, Any]:
        """Parameters with one value in every slice for every tensor."""
        return dict(self._fixed)

    @property
    def varies_by_tensor(self) -> bool:
        return len(self._fixed) < len(self.spec.params) or any(p.varies_by_tensor for p in self._parts)
