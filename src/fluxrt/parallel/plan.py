"""Which parallel plan a run uses: parsed from a name, checked against the model before anything is loaded.

    choose_plan(cfg, world, "auto") -> Plan(sp, tp, attention)     cfg: the model's TransformerConfig

Names (N = the world size):
  auto       Ulysses sequence parallel over N when N divides the heads, else ring attention over N (any head
             count). Not TP: TP needs N to divide the heads as well, and where both run Ulysses moves less data
             (two all-to-alls of q/k/v/out per block vs TP's all-reduces of full activations).
  sp, ring   Ulysses / ring sequence parallel over all N ranks      tp   tensor parallel over all N ranks
  sptp       an SP x TP mesh as square as possible, SP the larger side (4 -> 2 x 2, 8 -> 4 x 2)
  spN, ringN, tpN, spAtpB, ringAtpB   explicit sizes, whose product must be N ("1" on one rank)
  batch, batchN  the rows of each forward's batch over the N ranks (`BatchParallel`: a CFG model's two halves,
             several images); whole model on every rank, no sequence or tensor split
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PLAN_NAMES = ("auto", "sp", "ring", "tp", "sptp", "batch")
_EXPLICIT = re.compile(r"^(?:(sp|ring)(\d+))?(?:tp(\d+))?$")
_BATCH = re.compile(r"^batch(\d+)$")


@dataclass(frozen=True)
class Plan:
    sp: int
    tp: int
    attention: str  # "ulysses" or "ring" (how the SP part attends; unused when sp == 1)
    batch: int = 1  # ranks the forward's batch rows are split over (then sp == tp == 1)

    @property
    def world(self) -> int:
        return self.batch * self.sp * self.tp

    @property
    def name(self) -> str:
        if self.world == 1:
            return "1"
        if self.batch > 1:
            return f"batch{self.batch}"
        seq = f"{'ring' if self.attention == 'ring' else 'sp'}{self.sp}" if self.sp > 1 else ""
        return seq + (f"tp{self.tp}" if self.tp > 1 else "")


def parse_plan(name: str, world: int | None = None) -> Plan:
    """'1' -> Plan(1, 1); 'ring2tp2' -> Plan(2, 2, 'ring'); 'tp4' -> Plan(1, 4); with `world`, also the short names
    (sp, ring, tp, sptp; not auto, which needs the model) sized to it."""
    if name == "1":
        return Plan(1, 1, "ulysses")
    if world is not None and name == "batch":
        return Plan(1, 1, "ulysses", world)
    if _BATCH.match(name):
        return Plan(1, 1, "ulysses", int(_BATCH.match(name)[1]))
    if world is not None and name in ("sp", "ring", "tp"):
        return Plan(1, world, "ulysses") if name == "tp" else Plan(world, 1, "ring" if name == "ring" else "ulysses")
    if world is not None and name == "sptp":
        tp = max(d for d in range(1, world + 1) if world % d == 0 and d * d <= world)
        if tp == 1:
            raise ValueError(f"plan 'sptp' needs a world size with a factor pair, e.g. 4 or 8, not {world}")
        return Plan(world // tp, tp, "ulysses")
    m = _EXPLICIT.match(name)
    if not name or not m:
        raise ValueError(f"unknown parallel plan {name!r}: use {', '.join(PLAN_NAMES)}, spN, ringN, tpN, spAtpB, "
                         f"ringAtpB or batchN")  # fmt: skip
    return Plan(int(m[2] or 1), int(m[3] or 1), "ring" if m[1] == "ring" else "ulysses")


def check_plan(plan: Plan, cfg, world: int) -> Plan:
    """Raise a ValueError naming the numbers unless `plan` can run model `cfg` on `world` ranks; returns the plan."""
    if plan.world != world:
        raise ValueError(f"parallel plan {plan.name} needs {plan.world} ranks, the run has {world}")
    heads = cfg.num_heads
    if plan.tp > 1 and (heads % plan.tp or cfg.mlp_hidden % plan.tp):
        raise ValueError(f"tensor parallelism over {plan.tp} ranks needs it to divide the {heads} heads and the "
                         f"MLP width {cfg.mlp_hidden}")  # fmt: skip
    if plan.sp > 1 and plan.attention == "ulysses" and (heads // plan.tp) % plan.sp:
        raise ValueError(f"Ulysses over {plan.sp} ranks needs it to divide the {heads // plan.tp} heads per "
                         f"tensor-parallel rank; use ring attention (--parallel ring) for any head count")  # fmt: skip
    return plan


def choose_plan(cfg, world: int, name: str = "auto") -> Plan:
    """The plan `name` (module docstring) for model `cfg` on `world` ranks, checked."""
    if world < 1:
        raise ValueError(f"a run needs at least one rank, got {world}")
    if name == "auto":
        name = "sp" if cfg.num_heads % world == 0 else "ring"
    if world == 1:
        return Plan(1, 1, "ulysses")
    return check_plan(parse_plan(name, world), cfg, world)
