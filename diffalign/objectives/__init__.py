"""Objectives: what turns a method's loss into training batches. The trainer picks one by the method's kind.

An objective is built from a :class:`~diffalign.objectives.context.TrainContext`; it has ``batches()``
(an endless iterator of batches) and ``__call__(batch)`` returning a
:class:`~diffalign.methods.base.LossOutput`, and may define ``state_dict``/``load_state_dict`` (saved
in checkpoints), ``on_step_end(step)`` and ``evaluate()`` (the method's objective on fixed training
data, before and after training).

``pairs``    :class:`~diffalign.objectives.pairs.PairObjective` (DPO, MaPO)
``online``   :class:`~diffalign.objectives.online.OnlineObjective` (PRDP, DDPO, GRPO)
``winners``  :class:`~diffalign.objectives.winners.SePPOObjective` (SePPO)
"""

from diffalign.objectives.context import TrainContext, unwrap
from diffalign.objectives.online import OnlineObjective
from diffalign.objectives.pairs import PairObjective
from diffalign.objectives.winners import SePPOObjective

#: The objective class of each method kind (``MethodSpec.kind``).
OBJECTIVES = {"pairs": PairObjective, "online": OnlineObjective, "winners": SePPOObjective}

__all__ = ["OBJECTIVES", "OnlineObjective", "PairObjective", "SePPOObjective", "TrainContext", "unwrap"]
