"""Per-layer key/value memory with absolute positions: what a stream keeps, and how it grows.

Keys are stored after RoPE, so a kept token needs no re-rotation and its position never
changes; `positions` records the (t, h, w) position each kept token was given, per KV head,
because a policy may keep different tokens in different heads. Every head of a layer keeps
the same number of tokens, so a layer's cache is one dense tensor, but layers may differ.

Under a budget, old tokens make room for new ones by age and rank (docs/DESIGN.md section 7,
docs/MEMORY.md): a token's eviction key is its rank within what its chunk kept (about 0 for the
chunk's most important, about 1 for its least) times the chunk's age in chunks to the power
`age_power`, and the largest keys go first, in all layers together. So a chunk of age a holds
about min(1, c / a^p) of what its policy kept, in every layer alike, where c is what the budget
allows: the newest chunk keeps its policy's choice, older ones thin out, none grows with age.
Raw probe scores are not compared across chunks: a probe's attention to a chunk shrinks as the
memory before it grows, so old chunks (scored against a small memory) outranked new ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch


@dataclass
class LayerMemory:
    keys: torch.Tensor  # [1, kv_heads, M, head_dim], after RoPE
    values: torch.Tensor  # [1, kv_heads, M, head_dim]
    positions: torch.Tensor  # [kv_heads, M, 3] int64 absolute (t, h, w) positions
    importance: torch.Tensor  # [kv_heads, M] float32 score when kept; inf = text no policy prunes (the prompt)
    chunk: torch.Tensor  # [kv_heads, M] int64: the chunk each token came in with (its index in KVMemory.chunks)
    rank: torch.Tensor  # [kv_heads, M] float32: (j - 1/2) / k for the j-th most important of the k video tokens
    #                     its chunk kept in this layer and head; the chunk's text ranks with its first
    level: torch.Tensor  # [kv_heads, M] float32: the JS, in multiples of its policy's bound, of the smallest
    #                      one of its chunk's searched candidates that dropped it (inf: none did, or no search)

    def __len__(self) -> int:
        return self.keys.shape[2]


@dataclass
class ChunkRecord:
    """What ingesting one chunk did (KVMemory.chunks keeps the newest `records` of them). Written out flat
    (to_dict: `streamer ask --json`, snapshots), the policy's own keys beside the others."""

    frames: int
    tokens: int  # the chunk's tokens: its video and the text between its frames
    video_tokens: int
    kept: list[int]  # of the chunk's tokens, per layer
    evicted: list[int]  # older tokens evicted or forgotten to make room for it, per layer
    memory_tokens: float  # the memory's mean tokens per layer after it
    chosen: dict = field(default_factory=dict)  # the policy's report (ratios, js, ...; `capped` by the budget)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage: the runner's, the policy's, reading

    @property
    def ratios(self) -> list[float] | None:
        return self.chosen.get("ratios")

    @property
    def js(self) -> list[float] | None:
        return self.chosen.get("js")

    def to_dict(self) -> dict:
        record = dict(self.chosen, frames=self.frames, tokens=self.tokens, video_tokens=self.video_tokens,
                      kept=self.kept, evicted=self.evicted, memory_tokens=self.memory_tokens)
        return dict(record, timings=self.timings) if self.timings else record

    @classmethod
    def from_dict(cls, record: dict) -> "ChunkRecord":
        """A record as to_dict wrote it; an older snapshot's may lack video_tokens (then all its tokens were)."""
        own = ("frames", "tokens", "kept", "evicted", "memory_tokens", "video_tokens", "timings")
        kept = list(record["kept"])
        return cls(frames=record["frames"], tokens=record["tokens"],
                   video_tokens=record.get("video_tokens", record["tokens"]), kept=kept, evicted=list(record.get("evicted", [0] * len(kept))),
                   memory_tokens=record.get("memory_tokens", sum(kept) / max(len(kept), 1)),
                   chosen={k: v for k, v in record.items() if k not in own}, timings=dict(record.get("timings", {})))


@dataclass
class KVMemory:
    """The compact context of one stream: per-layer caches plus where the stream stands."""

    layers: list[LayerMemory]
    # tokens per layer on average: the layers together hold at most budget x layers tokens; None = unbounded
    budget: int | None = None
    # how age weighs in evictions: a chunk of age a keeps about c / a^age_power of what it kept (1: every
    # doubling of the past holds the same share of the memory; 0: every chunk thinned alike)
    age_power: float = 1.0
    # most positions the stream may span (None: the model's max_position_embeddings); past it the engine re-times
    # the memory's past onto fewer positions (streamer/engine/compaction.py)
    max_positions: int | None = None
    # > 0: tokens evicted under the budget go to `host` (CPU memory) instead of away, and a question brings back
    # up to this many per layer on average, of the chunks it attends to most (streamer/engine/recall.py); 0: none
    recall: int = 0
    # with recall: tokens per layer on average the host may keep (None: all); beyond it the host thins by the
    # same rank x age rule as the device
    host_budget: int | None = None
    # > 0: a question reads only the chunks it attends to most (the device's and the host's), up to this many tokens
    # per layer on average, and the prompt's text (streamer/engine/recall.py); 0: the whole memory
    focus: int = 0
    # > 0: tiered compaction. A chunk of age a gives up first the tokens its search's candidates dropped at a JS
    # of up to a^tier_growth times its bound (`level`), then evictions go on by rank x age; 0: rank x age alone
    tier_growth: float = 0.0
    time_shift: int = 0  # how far re-timing has moved the stream's newest positions back, in all
    next_position: int = 0  # first position of the next text token: 1 + the largest position used
    video_start: int | None = None  # where the video starts (its open vision block), once the prefix is in
    temporal_groups: int = 0  # frame pairs ingested so far: the next pair's temporal index
    grid_hw: tuple[int, int] | None = None  # patch grid of every frame in this stream
    fps: float | None = None  # frames per second of video time it is sampled at (time-based positions follow it)
    frames: int = 0  # frames ingested (before padding to pairs)
    full_tokens: int = 0  # tokens an unpruned memory would hold: prefix text + video
    evicted: int = 0  # tokens (summed over layers) removed to stay within the budget
    # the reports of the newest `records` chunks ingested (older ones are dropped: an endless stream's records
    # must not grow without end); every chunk since the start keeps the four numbers of `history`
    chunks: list[ChunkRecord] = field(default_factory=list)
    records: int = 1024
    history: dict[str, list[int]] = field(default_factory=lambda: {name: [] for name in HISTORY})
    # per probe prompt, its tokens (prompt and greedy answer) at the newest chunk: the engine drafts the next
    # chunk's probe answer from them (a hint for speed only, not in snapshots; replaced whole, never mutated)
    probe_drafts: dict[str, list[int]] = field(default_factory=dict, metadata=dict(snapshot=False))
    # with recall: per layer, the tokens evicted so far, on the CPU (not in snapshots: a saved memory is its
    # device part)
    host: list[LayerMemory] = field(default_factory=list, metadata=dict(snapshot=False))

    @classmethod
    def empty(cls, num_layers: int, kv_heads: int, head_dim: int, device, dtype,
              budget: int | None = None, age_power: float = 1.0, max_positions: int | None = None,
              recall: int = 0, host_budget: int | None = None, tier_growth: float = 0.0,
              focus: int = 0) -> "KVMemory":
        check_age_power(age_power)
        check_tier_growth(tier_growth)
        if recall < 0:
            raise ValueError(f"memory recall must be >= 0 tokens per layer (0: evicted tokens are gone), got {recall}")
        if focus < 0:
            raise ValueError(f"memory focus must be >= 0 tokens per layer (0: a question reads it all), got {focus}")
        if host_budget is not None and host_budget < 1:
            raise ValueError(f"memory host_budget must be >= 1 token per layer (None: unbounded), got {host_budget}")
        memory = cls(layers=[empty_layer(kv_heads, head_dim, device, dtype) for _ in range(num_layers)],
                     budget=budget, age_power=age_power, max_positions=max_positions, recall=recall,
                     host_budget=host_budget, tier_growth=float(tier_growth), focus=focus)
        memory.reset_host()
        return memory

    def reset_host(self) -> None:
        """An empty host (CPU) layer per layer where recall keeps evicted tokens, none without recall."""
        _, heads, _, dim = self.layers[0].keys.shape
        self.host = [empty_layer(heads, dim, "cpu", self.layers[0].keys.dtype) for _ in self.layers] \
            if self.recall else []

    def fork(self) -> "KVMemory":
        """A copy to extend without changing this memory. It shares the tensors: commit, forget and
        evictions put new tensors in place of the old ones, never write into them."""
        return replace(self, layers=[replace(layer) for layer in self.layers], chunks=list(self.chunks),
                       host=[replace(layer) for layer in self.host],
                       history={name: list(values) for name, values in self.history.items()})

    @property
    def chunk_count(self) -> int:
        """Chunks ingested since the stream started (a token's `chunk` counts from 0 up to this)."""
        return len(self.history["frames"])

    def context(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values): what a forward after this memory attends to."""
        return [(layer.keys, layer.values) for layer in self.layers]

    def tokens_per_layer(self) -> list[int]:
        return [len(layer) for layer in self.layers]

    def mean_tokens(self) -> float:
        counts = self.tokens_per_layer()
        return sum(counts) / len(counts)

    def check_grid(self, grid_hw: tuple[int, int]) -> None:
        """Refuse frames of another size than the stream's (before any work is spent on them)."""
        if self.grid_hw is not None and self.grid_hw != tuple(grid_hw):
            raise ValueError(f"frame size changed mid-stream: patch grid {tuple(grid_hw)} after {self.grid_hw}; "
                             "every frame of a stream must have the same size")

    def check_fps(self, fps: float) -> None:
        """Refuse a rate that is not a number > 0, or another rate than the stream's (its positions would be
        out of time)."""
        if not (fps > 0 and math.isfinite(fps)):
            raise ValueError(f"fps must be a finite number > 0, got {fps}")
        if self.fps is not None and fps != self.fps:
            raise ValueError(f"frame rate changed mid-stream: {fps} fps after {self.fps}; a stream keeps one rate")

    def position_after(self, positions: torch.Tensor) -> int:
        """Where text after tokens at `positions` [n, 3] starts: 1 + the largest position used."""
        return max(self.next_position, int(positions.max()) + 1)

    def commit(self, new_kv: list[tuple[torch.Tensor, torch.Tensor]], positions: torch.Tensor,
               protected: torch.Tensor, kept: list[torch.Tensor] | None, scores: list[torch.Tensor] | None, *,
               frames: int, grid_thw: tuple[int, int, int], fps: float, video_start: int, chosen: dict,
               forget_before: int | None = None, levels: list[torch.Tensor] | None = None) -> ChunkRecord:
        """Append a chunk's kept tokens to every layer, in position order, and advance the stream.

        new_kv[l]: the chunk's keys and values in layer l, [1, kv_heads, chunk_len, head_dim];
        positions: [chunk_len, 3]; protected: [chunk_len] bool (stored with infinite importance);
        kept[l]: [kv_heads, k] sorted chunk indices each head keeps (None: all); scores[l]: [kv_heads,
        chunk_len] importance, which ranks the chunk's tokens for evictions (None: zeros, the later first);
        grid_thw: the chunk's patch grid; fps: its frame rate; video_start: where the stream's vision block
        starts; forget_before: drop the stored video tokens whose temporal position is below it first; levels[l]:
        [kv_heads, chunk_len] each token's JS level (LayerMemory.level; None: inf, no search dropped it). With a
        budget the chunk takes at most half of it (cap_chunk) and old tokens are evicted first (make_room). All or
        nothing: a chunk refused (frame size, budget) leaves the memory as it was. Returns the chunk's record
        (`chosen`: the policy's report, plus `capped` when the budget cut the chunk), also kept in `chunks`.
        """
        self.check_grid(grid_thw[1:])
        self.check_fps(fps)
        chunk_len = positions.shape[0]
        heads = self.layers[0].keys.shape[1]
        chose = kept
        kept, capped = cap_chunk(self, kept, scores, protected, chunk_len)
        if capped is not None:
            chosen = dict(chosen, capped=capped)
        incoming = [chunk_len] * len(self.layers) if kept is None else [k.shape[1] for k in kept]
        # every layer before any changes, so a refused chunk leaves the memory as it was; forgetting frees only
        # what eviction could, so the same chunks fit either way
        check_room(self, incoming)
        forgotten = self.forget(forget_before) if forget_before is not None else [0] * len(self.layers)
        evicted = [a + b for a, b in zip(forgotten, make_room(self, incoming))]
        index = self.chunk_count
        for idx, (layer, (keys, values)) in enumerate(zip(self.layers, new_kv)):
            device = layer.positions.device
            importance = torch.zeros(heads, chunk_len, device=device) if scores is None else scores[idx].float().to(device)
            importance = importance.masked_fill(protected.to(device), float("inf"))
            chunk = torch.full((heads, chunk_len), index, dtype=torch.long, device=device)
            level = torch.full((heads, chunk_len), float("inf"), device=device) if levels is None \
                else levels[idx].float().to(device)
            new = LayerMemory(keys, values, positions.to(device).unsqueeze(0).expand(heads, -1, -1), importance,
                              chunk, torch.zeros(heads, chunk_len, device=device), level)
            if capped is not None:  # what the policy kept and the cap did not: evicted as it comes in
                cut = torch.zeros(heads, chunk_len, dtype=torch.bool, device=device)
                if chose is None:
                    cut[:] = True
                else:
                    cut.scatter_(1, chose[idx].to(device), True)
                cut.scatter_(1, kept[idx].to(device), False)
                _offload(self, idx, new, cut.nonzero()[:, 1].view(heads, -1))
            if kept is not None:
                _keep_columns(new, kept[idx].to(device))
            new.rank = chunk_ranks(new.importance)
            append(layer, new)
        self.next_position = self.position_after(positions)
        self.video_start = video_start
        self.grid_hw = tuple(grid_thw[1:])
        self.fps = fps
        self.temporal_groups += grid_thw[0]
        self.frames += frames
        self.full_tokens += chunk_len
        video = int((~protected).sum())
        record = ChunkRecord(frames=frames, tokens=chunk_len, video_tokens=video, kept=incoming, evicted=evicted,
                             memory_tokens=self.mean_tokens(), chosen=chosen)
        if self.host and self.host_budget is not None:  # what went to the host this chunk may overfill it
            over = sum(len(layer) for layer in self.host) - self.host_budget * len(self.host)
            if over > 0:
                thin(self, self.host, over)
        self.chunks.append(record)  # a fork holds its own list (fork copies it)
        del self.chunks[:-self.records]
        text = chunk_len - video
        for name, value in zip(HISTORY, (frames, video, text, sum(incoming) - text * len(self.layers))):
            self.history[name].append(value)
        return record


    def forget(self, before: int) -> list[int]:
        """Drop the stored video tokens whose temporal position is below `before` (prompt text stays);
        returns the number dropped per layer. Every head of a layer must hold the same positions."""
        keeps = [(layer.positions[:, :, 0] >= before) | torch.isinf(layer.importance) for layer in self.layers]
        for idx, keep in enumerate(keeps):  # every layer before any changes
            counts = keep.sum(dim=1)
            if bool((counts != counts[0]).any()):
                raise ValueError(f"layer {idx}'s heads hold different tokens: cannot forget by position")
        dropped = []
        for idx, (layer, keep) in enumerate(zip(self.layers, keeps)):
            dropped.append(len(layer) - int(keep[0].sum()))
            _offload(self, idx, layer, (~keep).nonzero()[:, 1].view(keep.shape[0], -1))
            _keep_columns(layer, keep.nonzero()[:, 1].view(keep.shape[0], -1))
        self.evicted += sum(dropped)
        return dropped


TOKEN_FIELDS = ("keys", "values", "positions", "importance", "chunk", "rank", "level")  # per-token tensors of a LayerMemory
# per chunk since the stream started: its frames, its video and text tokens, and the video tokens its policy kept
# (summed over layers): what coverage and the prompt's frame times need, once its report is gone
HISTORY = ("frames", "video_tokens", "text_tokens", "kept")


def empty_layer(kv_heads: int, head_dim: int, device, dtype) -> LayerMemory:
    kv = torch.empty(1, kv_heads, 0, head_dim, device=device, dtype=dtype)
    return LayerMemory(kv, kv.clone(), torch.empty(kv_heads, 0, 3, dtype=torch.long, device=device),
                       torch.empty(kv_heads, 0, device=device), torch.empty(kv_heads, 0, dtype=torch.long, device=device),
                       torch.empty(kv_heads, 0, device=device), torch.empty(kv_heads, 0, device=device))


def columns(layer: LayerMemory, keep: torch.Tensor, device=None) -> LayerMemory:
    """A new LayerMemory of the tokens at sorted indices keep [kv_heads, k] per head (on `device` if given)."""
    part = replace(layer)
    _keep_columns(part, keep)
    return part if device is None else LayerMemory(*(getattr(part, name).to(device) for name in TOKEN_FIELDS))


def append(layer: LayerMemory, new: LayerMemory) -> None:
    """Put `new`'s tokens after the layer's (new tensors: a fork sharing the old ones is unchanged)."""
    for name in TOKEN_FIELDS:
        dim = 2 if name in ("keys", "values") else 1
        setattr(layer, name, torch.cat([getattr(layer, name), getattr(new, name)], dim=dim))


def _offload(memory: KVMemory, idx: int, layer: LayerMemory, evicted: torch.Tensor) -> None:
    """With recall, `layer`'s tokens at sorted indices evicted [kv_heads, k] go to layer idx of the host, not away."""
    if memory.recall and evicted.shape[1]:
        append(memory.host[idx], columns(layer, evicted, "cpu"))


def _keep_columns(layer: LayerMemory, keep: torch.Tensor) -> None:
    """Keep, per head, the tokens at sorted indices keep [kv_heads, k]."""
    heads, dim = layer.keys.shape[1], layer.keys.shape[3]
    gather = keep[None, :, :, None].expand(1, heads, keep.shape[1], dim)
    layer.keys = layer.keys.gather(2, gather)
    layer.values = layer.values.gather(2, gather)
    layer.positions = layer.positions.gather(1, keep[:, :, None].expand(-1, -1, 3))
    for name in ("importance", "chunk", "rank", "level"):
        setattr(layer, name, getattr(layer, name).gather(1, keep))


def chunk_ranks(importance: torch.Tensor) -> torch.Tensor:
    """[kv_heads, k] importance of the tokens one chunk kept (inf: prompt text) -> per head (j - 1/2) / n for the
    j-th most important of its n video tokens; its text (frame times, where the model has them) ranks with its most important
    token, so it goes with the chunk's last. Equal scores rank the later token higher (so a scoreless chunk thins
    from its start, as a window would)."""
    video = torch.isfinite(importance)
    count = int(video[0].sum())
    rank = torch.full_like(importance, 0.5 / count if count else 1.0, dtype=torch.float32)
    if count == 0:
        return rank
    scores = importance.flip(1).masked_fill(~video.flip(1), float("-inf"))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :count]
    # the middle of each token's share: a chunk that kept one token keeps it as long as half of a chunk of many
    places = (torch.arange(count, device=importance.device, dtype=torch.float32) + 0.5) / count
    return rank.scatter_(1, importance.shape[1] - 1 - order, places.expand(importance.shape[0], -1).contiguous())


def check_age_power(age_power: float) -> None:
    if not (0 <= age_power <= MAX_AGE_POWER):
        raise ValueError(f"memory age_power must be between 0 and {MAX_AGE_POWER}, got {age_power}")


MAX_AGE_POWER = 8.0  # beyond this the oldest chunk goes first anyway, whatever it ranks


def check_tier_growth(tier_growth: float) -> None:
    if not (0 <= tier_growth <= MAX_AGE_POWER):
        raise ValueError(f"memory tier_growth must be between 0 (off) and {MAX_AGE_POWER}, got {tier_growth}")


def eviction_keys(memory: KVMemory, layer: LayerMemory) -> torch.Tensor:
    """[kv_heads, M] float64: rank x age^age_power per token (largest evicted first); -inf for the prompt before
    the video, which is never evicted. Age counts chunks back from the one being added (the newest stored chunk is
    1 old). Every head of a layer holds the same keys (each kept the same number per chunk), so every head evicts
    the same (chunk, rank) places.

    Tiered (tier_growth > 0): a token whose level its chunk's age allows (level <= age^tier_growth: a candidate of
    its chunk's search dropped it at a JS that many times the bound) ranks above every other, so the JS bound,
    loosening with age, decides how far each chunk is compacted before rank x age thins what it kept."""
    age = (memory.chunk_count - layer.chunk).double()
    keys = layer.rank.double() * age.pow(memory.age_power)
    if memory.tier_growth:
        allowed = layer.level.double() <= age.pow(memory.tier_growth)
        keys = torch.where(allowed, keys + float(memory.chunk_count) ** memory.age_power + 1, keys)
    return keys.masked_fill(prompt_tokens(memory, layer), float("-inf"))


def prompt_tokens(memory: KVMemory, layer: LayerMemory) -> torch.Tensor:
    """Bool [kv_heads, M]: the prompt before the video (the system turn), which no budget evicts; text between frame
    pairs (frame times, where the model has them) is evicted with its chunk. The video starts at video_start, and re-timing never moves
    a position across it."""
    if memory.video_start is None:
        return torch.zeros_like(layer.importance, dtype=torch.bool)
    return layer.positions[..., 0] < memory.video_start


def cap_chunk(memory: KVMemory, kept: list[torch.Tensor] | None, scores: list[torch.Tensor] | None,
              protected: torch.Tensor, chunk_len: int) -> tuple[list[torch.Tensor] | None, float | None]:
    """A chunk takes at most half the budget: beyond it every layer keeps the same share of the video tokens the
    policy chose, the most important, so that one busy chunk (EMLoC keeping all of it when no ratio stays within
    its bound) neither empties the memory of the past nor is refused. Returns the chunk's kept indices and that
    share (None: not capped)."""
    layers = len(memory.layers)
    if memory.budget is None:
        return kept, None
    text = int(protected.sum())
    heads = memory.layers[0].keys.shape[1]
    chosen = kept or [torch.arange(chunk_len).expand(heads, -1)] * layers
    video = [k.shape[1] - text for k in chosen]
    room = memory.budget * layers // 2 - text * layers
    if sum(video) <= room or room <= 0:  # fits, or not even the text fits (check_room refuses it)
        return kept, None
    share = room / sum(video)
    capped = []
    for idx, count in enumerate(video):
        indices = chosen[idx].to(protected.device)
        score = scores[idx].float().to(protected.device) if scores is not None else torch.zeros(heads, chunk_len)
        # prompt text always stays; a policy's own infinite scores (window's sinks) rank just below it
        score = score.nan_to_num(posinf=torch.finfo(score.dtype).max).masked_fill(protected, float("inf"))
        score = score.gather(1, indices)
        top = score.topk(text + math.floor(count * share), dim=1, sorted=False).indices
        capped.append(indices.gather(1, top).sort(dim=1).values)
    return capped, share


def check_room(memory: KVMemory, incoming: list[int]) -> None:
    """Refuse a chunk that no eviction can fit: `incoming[l]` new tokens in layer l and the prompt text held
    beyond the budget of all layers together."""
    if memory.budget is None:
        return
    limit = memory.budget * len(memory.layers)
    text = sum(int(prompt_tokens(memory, layer)[0].sum()) for layer in memory.layers)
    if sum(incoming) + text > limit:
        raise ValueError(
            f"memory budget {memory.budget} tokens per layer ({limit} over {len(memory.layers)} layers) cannot hold "
            f"the new chunk ({sum(incoming) / len(incoming):.0f} tokens kept per layer) plus the prompt text; raise "
            "the budget or lower chunk_frames"
        )


def make_room(memory: KVMemory, incoming: list[int]) -> list[int]:
    """Evict old tokens so that the layers can take `incoming[l]` new ones within the budget of all layers
    together, the largest eviction keys first (eviction_keys; among equal keys the older chunk, then the lower
    layer). Prompt text is never evicted. The caller has checked that they fit (check_room). Returns the number
    of tokens evicted per layer."""
    if memory.budget is None:
        return [0] * len(memory.layers)
    excess = sum(len(layer) for layer in memory.layers) + sum(incoming) - memory.budget * len(memory.layers)
    if excess <= 0:
        return [0] * len(memory.layers)
    counts = thin(memory, memory.layers, excess)
    memory.evicted += excess
    return counts


def thin(memory: KVMemory, layers: list[LayerMemory], excess: int) -> list[int]:
    """Remove `excess` tokens from `layers` (the device's, or the host's) together, the largest eviction keys
    first; those leaving the device go to the host where recall keeps them. Returns the count per layer."""
    keys = [eviction_keys(memory, layer) for layer in layers]
    # one ranking of head 0's keys over all layers decides how many each layer gives up; equal keys go older
    # chunk first, then lower layer (a stable sort by chunk, then a stable one by key)
    owner = torch.cat([torch.full((len(layer),), idx) for idx, layer in enumerate(layers)])
    by_chunk = torch.sort(torch.cat([layer.chunk[0].cpu() for layer in layers]), stable=True).indices
    by_key = torch.sort(torch.cat([k[0].cpu() for k in keys])[by_chunk], descending=True, stable=True).indices
    counts = torch.bincount(owner[by_chunk[by_key[:excess]]], minlength=len(layers)).tolist()
    for idx, (layer, layer_keys, count) in enumerate(zip(layers, keys, counts)):
        if count:
            order = torch.sort(layer_keys, dim=1, descending=True, stable=True).indices
            if layers is memory.layers:
                _offload(memory, idx, layer, order[:, :count].sort(dim=1).values)
            _keep_columns(layer, order[:, count:].sort(dim=1).values)  # back to position order
    return counts


def default_stretches(seconds: float) -> list[tuple[str, float, float]]:
    """(label, from, to) in seconds of video time: the quarters of a stream `seconds` long, its last minute, last
    10 minutes and last hour, and its first hour (each within the stream)."""
    quarters = [(f"quarter {k + 1} of 4", seconds * k / 4, seconds * (k + 1) / 4) for k in range(4)]
    recent = [(label, max(0.0, seconds - span), seconds)
              for label, span in (("last minute", 60), ("last 10 minutes", 600), ("last hour", 3600))]
    return quarters + recent + [("first hour", 0.0, min(seconds, 3600.0))]


def chunk_stretches(memory: KVMemory, count: int) -> list[tuple[str, float, float]]:
    """At most `count` stretches of whole chunks, as many chunks each (the last may have fewer), in seconds:
    every stretch holds a chunk's middle, whatever the chunks' lengths (a short one after a flush)."""
    fps = memory.fps or 1.0
    starts = torch.tensor([0] + memory.history["frames"]).cumsum(0).double() / fps
    per = -(-memory.chunk_count // count)  # chunks per stretch
    bounds = [float(starts[k]) for k in range(0, memory.chunk_count, per)] + [float(starts[-1])]
    return [(f"{k + 1} of {len(bounds) - 1}", bounds[k], bounds[k + 1]) for k in range(len(bounds) - 1)]


def coverage(memory: KVMemory, stretches: list[tuple[str, float, float]] | None = None,
             layers: list[LayerMemory] | None = None) -> list[dict]:
    """How much of each stretch of the stream the memory still holds, a chunk counting where its middle lies:
    `held`, the share of the stretch's video tokens still in the memory (mean over layers), and `of_kept`, the
    share of those its policy kept that evictions have left. Default stretches: default_stretches. `layers`:
    whose tokens count (default the device's; memory.host: what a question may recall)."""
    fps = memory.fps or 1.0
    history = memory.history
    starts = torch.tensor([0] + history["frames"]).cumsum(0).double() / fps
    middles = (starts[:-1] + starts[1:]) / 2
    video = torch.tensor(history["video_tokens"], dtype=torch.float64)
    kept = torch.tensor(history["kept"], dtype=torch.float64)
    held = torch.stack([torch.bincount(layer.chunk[0][torch.isfinite(layer.importance[0])].cpu(),
                                       minlength=memory.chunk_count).double()
                        for layer in (memory.layers if layers is None else layers)], dim=1)
    report = []
    for label, start, end in stretches if stretches is not None else default_stretches(float(starts[-1])):
        inside = (middles >= start) & (middles < end)
        taken, policy = video[inside].sum() * len(memory.layers), kept[inside].sum()
        report.append(dict(stretch=label, start_s=round(start, 3), end_s=round(end, 3),
                           held=round(float(held[inside].sum() / taken), 4) if taken else None,
                           of_kept=round(float(held[inside].sum() / policy), 4) if policy else None))
    return report
