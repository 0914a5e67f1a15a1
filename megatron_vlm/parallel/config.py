"""Parallel layout: the one place TP / PP / CP / EP / expert-TP / DP sizes are declared and checked."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1                     # tensor parallel (attention and dense MLP)
    pp: int = 1                     # pipeline stages
    cp: int = 1                     # context parallel (sequence split in 2*cp load-balanced chunks)
    ep: int = 1                     # expert parallel
    etp: int | None = None          # expert tensor parallel; None = tp (megatron's default)
    sequence_parallel: bool | None = None  # None = on whenever tp > 1 (megatron requires it for MoE)
    token_dispatcher: str = "alltoall"     # MoE dispatcher: "alltoall" | "allgather"
    distributed_optimizer: bool = True
    microbatch_group_size: int | None = None  # unused unless virtual pipeline is added

    def __post_init__(self):
        for name in ("tp", "pp", "cp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel.{name} must be a positive integer, got {value!r}")
        if self.etp is not None and (not isinstance(self.etp, int) or self.etp < 1):
            raise ValueError(f"parallel.etp must be a positive integer or null, got {self.etp!r}")
        if self.ep == 1 and self.etp is not None and self.etp != self.tp:
            # With EP=1 megatron's DDP treats expert weights as dense and reduces them over the
            # attention DP group only; with etp != tp the expert-DP ranks would silently disagree.
            raise ValueError(f"parallel.etp ({self.etp}) must equal parallel.tp ({self.tp}) when "
                             f"parallel.ep is 1")
        if self.token_dispatcher not in ("alltoall", "allgather"):
            raise ValueError(f"parallel.token_dispatcher must be 'alltoall' or 'allgather', "
                             f"got {self.token_dispatcher!r}")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel=true needs parallel.tp > 1")

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def use_sequence_parallel(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel

    def data_parallel_size(self, world_size: int) -> int:
        """DP for attention/dense layers; raises naming the layout when the world does not factor."""
        model = self.tp * self.pp * self.cp
        if world_size % model:
            raise ValueError(f"world size {world_size} is not divisible by tp*pp*cp = "
                             f"{self.tp}*{self.pp}*{self.cp} = {model}")
        dp = world_size // model
        expert_model = self.expert_tp * self.ep * self.pp
        if world_size % expert_model:
            raise ValueError(f"world size {world_size} is not divisible by etp*ep*pp = "
                             f"{self.expert_tp}*{self.ep}*{self.pp} = {expert_model}")
        return dp

    def expert_data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.expert_tp * self.ep * self.pp)

    def describe(self, world_size: int) -> str:
        return (f"TP={self.tp} x PP={self.pp} x CP={self.cp} x DP={self.data_parallel_size(world_size)}"
                f" = {world_size}; experts: ETP={self.expert_tp} x EP={self.ep} x "
                f"EDP={self.expert_data_parallel_size(world_size)} x PP={self.pp}")
