"""The speculative steps as device programs the model runner compiles and runs for the decoder
(``ModelRunner.run``, its ``DeviceProgram`` protocol): a program names its compile key, its jitted
function over (state, kv, sampler, inputs) and an example of its inputs. The runner knows none of
them; they reach its weights, pool and geometry through the runner they are handed."""

from __future__ import annotations

import dataclasses
import functools

from jaxinfer.spec.batch import DraftShape, TreeShape, build_draft_input, build_tree_input
from jaxinfer.spec.eagle import draft_step
from jaxinfer.spec.round import RoundShape, build_round_input, round_step
from jaxinfer.spec.tree import pack
from jaxinfer.spec.verify import verify_step


@dataclasses.dataclass(frozen=True)
class VerifyProgram:
    """Verify drafted trees of this shape, commit the accepted paths' KV (jaxinfer.spec.verify)."""

    shape: TreeShape
    name = "verify"
    writes = True

    @property
    def key(self) -> TreeShape:
        return self.shape

    @property
    def annotation(self) -> dict:
        return dict(rows=self.shape.num_rows, nodes=self.shape.num_nodes)

    def function(self, runner):
        return functools.partial(verify_step, runner.graphdef, runner.head_graphdef, runner.max_logprobs,
                                 self.shape.path_len)

    def example(self, runner):
        shape = self.shape
        return build_tree_input([], pack([], shape.num_rows, shape.num_nodes), shape, runner.kv.page_size,
                                runner.builder.max_pages_per_seq, runner.scheduler_config.max_num_seqs,
                                impl=runner.impl, interpret=runner.interpret)


@dataclasses.dataclass(frozen=True)
class DraftProgram:
    """The draft head's tree expansion (jaxinfer.spec.eagle): reads the KV and pending features,
    writes nothing."""

    shape: DraftShape
    name = "draft"
    writes = False

    @property
    def key(self) -> DraftShape:
        return self.shape

    @property
    def annotation(self) -> dict:
        return dict(rows=self.shape.num_rows, depth=self.shape.depth)

    def function(self, runner):
        shape = self.shape
        return functools.partial(draft_step, runner.head_graphdef, runner.graphdef, shape.top_k, shape.depth,
                                 shape.base_depth, shape.kv_tokens)

    def example(self, runner):
        return build_draft_input([], self.shape.num_rows, runner.builder.max_pages_per_seq)


@dataclasses.dataclass(frozen=True)
class RoundProgram:
    """A whole draft-head round, drafting to the KV commit, under a policy (jaxinfer.spec.round)."""

    shape: RoundShape
    variants: tuple[tuple[int, int], ...]
    thresholds: tuple[float, ...]
    name = "round"
    writes = True

    @property
    def key(self) -> tuple:
        return (self.shape, self.variants, self.thresholds)

    @property
    def annotation(self) -> dict:
        return dict(rows=self.shape.num_rows, nodes=self.shape.num_nodes)

    def function(self, runner):
        return functools.partial(round_step, runner.graphdef, runner.head_graphdef, runner.max_logprobs, self.shape,
                                 self.variants, self.thresholds, runner.impl, runner.interpret)

    def example(self, runner):
        return build_round_input([], [], self.shape.num_rows, runner.builder.max_pages_per_seq,
                                 runner.scheduler_config.max_num_seqs)
