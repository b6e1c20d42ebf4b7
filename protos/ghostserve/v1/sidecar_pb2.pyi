from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT8: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]

class Code(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODE_UNSPECIFIED: _ClassVar[Code]
    NONE: _ClassVar[Code]
    REPLICATE: _ClassVar[Code]
    XOR: _ClassVar[Code]
    RDP: _ClassVar[Code]
    RS: _ClassVar[Code]

class ChunkState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHUNK_STATE_UNSPECIFIED: _ClassVar[ChunkState]
    WAITING_FOR_RANKS: _ClassVar[ChunkState]
    QUEUED: _ClassVar[ChunkState]
    PROTECTED: _ClassVar[ChunkState]
    UNPROTECTED: _ClassVar[ChunkState]

class ChunkFailure(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHUNK_FAILURE_UNSPECIFIED: _ClassVar[ChunkFailure]
    NOT_PROTECTED: _ClassVar[ChunkFailure]
    EVICTED: _ClassVar[ChunkFailure]
    CHECKSUM_MISMATCH: _ClassVar[ChunkFailure]
    TOO_MANY_LOSSES: _ClassVar[ChunkFailure]

class HealthKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEALTH_KIND_UNSPECIFIED: _ClassVar[HealthKind]
    HEALTHY: _ClassVar[HealthKind]
    XID: _ClassVar[HealthKind]
    ECC_DOUBLE_BIT: _ClassVar[HealthKind]
    RETIRED_PAGES: _ClassVar[HealthKind]
    REMAPPED_ROWS: _ClassVar[HealthKind]
    GPU_LOST: _ClassVar[HealthKind]
DTYPE_UNSPECIFIED: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT8: DType
FLOAT32: DType
CODE_UNSPECIFIED: Code
NONE: Code
REPLICATE: Code
XOR: Code
RDP: Code
RS: Code
CHUNK_STATE_UNSPECIFIED: ChunkState
WAITING_FOR_RANKS: ChunkState
QUEUED: ChunkState
PROTECTED: ChunkState
UNPROTECTED: ChunkState
CHUNK_FAILURE_UNSPECIFIED: ChunkFailure
NOT_PROTECTED: ChunkFailure
EVICTED: ChunkFailure
CHECKSUM_MISMATCH: ChunkFailure
TOO_MANY_LOSSES: ChunkFailure
HEALTH_KIND_UNSPECIFIED: HealthKind
HEALTHY: HealthKind
XID: HealthKind
ECC_DOUBLE_BIT: HealthKind
RETIRED_PAGES: HealthKind
REMAPPED_ROWS: HealthKind
GPU_LOST: HealthKind

class KVLayout(_message.Message):
    __slots__ = ("layers", "kv_heads", "head_dim", "dtype", "page_size", "pool_slots")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    POOL_SLOTS_FIELD_NUMBER: _ClassVar[int]
    layers: int
    kv_heads: int
    head_dim: int
    dtype: DType
    page_size: int
    pool_slots: int
    def __init__(self, layers: _Optional[int] = ..., kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., page_size: _Optional[int] = ..., pool_slots: _Optional[int] = ...) -> None: ...

class Protection(_message.Message):
    __slots__ = ("code", "parity_shards", "chunk_tokens")
    CODE_FIELD_NUMBER: _ClassVar[int]
    PARITY_SHARDS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    code: Code
    parity_shards: int
    chunk_tokens: int
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., parity_shards: _Optional[int] = ..., chunk_tokens: _Optional[int] = ...) -> None: ...

class PoolHandle(_message.Message):
    __slots__ = ("kind", "shm_name", "nbytes", "row_bytes", "cuda_handle", "generation")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHM_NAME_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    ROW_BYTES_FIELD_NUMBER: _ClassVar[int]
    CUDA_HANDLE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    kind: str
    shm_name: str
    nbytes: int
    row_bytes: int
    cuda_handle: bytes
    generation: int
    def __init__(self, kind: _Optional[str] = ..., shm_name: _Optional[str] = ..., nbytes: _Optional[int] = ..., row_bytes: _Optional[int] = ..., cuda_handle: _Optional[bytes] = ..., generation: _Optional[int] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("group", "rank", "world_size", "layout", "protection", "worker_id", "device_uuid", "parity_budget_bytes")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    PROTECTION_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    PARITY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    group: str
    rank: int
    world_size: int
    layout: KVLayout
    protection: Protection
    worker_id: str
    device_uuid: str
    parity_budget_bytes: int
    def __init__(self, group: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., protection: _Optional[_Union[Protection, _Mapping]] = ..., worker_id: _Optional[str] = ..., device_uuid: _Optional[str] = ..., parity_budget_bytes: _Optional[int] = ...) -> None: ...

class AttachResponse(_message.Message):
    __slots__ = ("pool", "created", "needs_rebuild")
    POOL_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    NEEDS_REBUILD_FIELD_NUMBER: _ClassVar[int]
    pool: PoolHandle
    created: bool
    needs_rebuild: bool
    def __init__(self, pool: _Optional[_Union[PoolHandle, _Mapping]] = ..., created: _Optional[bool] = ..., needs_rebuild: _Optional[bool] = ...) -> None: ...

class DetachRequest(_message.Message):
    __slots__ = ("group", "rank")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    group: str
    rank: int
    def __init__(self, group: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class DetachResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CommitChunkRequest(_message.Message):
    __slots__ = ("group", "rank", "request_id", "chunk_index", "slots", "token_ids")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    group: str
    rank: int
    request_id: str
    chunk_index: int
    slots: _containers.RepeatedScalarFieldContainer[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, group: _Optional[str] = ..., rank: _Optional[int] = ..., request_id: _Optional[str] = ..., chunk_index: _Optional[int] = ..., slots: _Optional[_Iterable[int]] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class CommitChunkResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: ChunkState
    def __init__(self, state: _Optional[_Union[ChunkState, str]] = ...) -> None: ...

class CommitChunksRequest(_message.Message):
    __slots__ = ("group", "rank", "chunks")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    group: str
    rank: int
    chunks: _containers.RepeatedCompositeFieldContainer[ChunkCommit]
    def __init__(self, group: _Optional[str] = ..., rank: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[ChunkCommit, _Mapping]]] = ...) -> None: ...

class ChunkCommit(_message.Message):
    __slots__ = ("request_id", "chunk_index", "slots", "token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    chunk_index: int
    slots: _containers.RepeatedScalarFieldContainer[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., chunk_index: _Optional[int] = ..., slots: _Optional[_Iterable[int]] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class CommitChunksResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ChunkCommitResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ChunkCommitResult, _Mapping]]] = ...) -> None: ...

class ChunkCommitResult(_message.Message):
    __slots__ = ("code", "message", "state")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    state: ChunkState
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., state: _Optional[_Union[ChunkState, str]] = ...) -> None: ...

class RecordTokensRequest(_message.Message):
    __slots__ = ("group", "request_id", "token_ids", "prompt_tokens", "max_new_tokens")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    group: str
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    prompt_tokens: int
    max_new_tokens: int
    def __init__(self, group: _Optional[str] = ..., request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., prompt_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ...) -> None: ...

class RecordTokensResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeRequestRequest(_message.Message):
    __slots__ = ("group", "request_id")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    group: str
    request_id: str
    def __init__(self, group: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ChunkLedger(_message.Message):
    __slots__ = ("chunk_index", "slots", "state", "kv_valid")
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    KV_VALID_FIELD_NUMBER: _ClassVar[int]
    chunk_index: int
    slots: _containers.RepeatedScalarFieldContainer[int]
    state: ChunkState
    kv_valid: bool
    def __init__(self, chunk_index: _Optional[int] = ..., slots: _Optional[_Iterable[int]] = ..., state: _Optional[_Union[ChunkState, str]] = ..., kv_valid: _Optional[bool] = ...) -> None: ...

class RequestLedger(_message.Message):
    __slots__ = ("group", "request_id", "token_ids", "prompt_tokens", "chunk_tokens", "chunks", "max_new_tokens")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    group: str
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    prompt_tokens: int
    chunk_tokens: int
    chunks: _containers.RepeatedCompositeFieldContainer[ChunkLedger]
    max_new_tokens: int
    def __init__(self, group: _Optional[str] = ..., request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., prompt_tokens: _Optional[int] = ..., chunk_tokens: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[ChunkLedger, _Mapping]]] = ..., max_new_tokens: _Optional[int] = ...) -> None: ...

class ReleaseRequestRequest(_message.Message):
    __slots__ = ("group", "request_id")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    group: str
    request_id: str
    def __init__(self, group: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ReleaseRequestResponse(_message.Message):
    __slots__ = ("freed_bytes",)
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    freed_bytes: int
    def __init__(self, freed_bytes: _Optional[int] = ...) -> None: ...

class DescribeGroupRequest(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: str
    def __init__(self, group: _Optional[str] = ...) -> None: ...

class RankState(_message.Message):
    __slots__ = ("rank", "attached", "pool_valid", "worker_id", "pool", "device_uuid")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    POOL_VALID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    rank: int
    attached: bool
    pool_valid: bool
    worker_id: str
    pool: PoolHandle
    device_uuid: str
    def __init__(self, rank: _Optional[int] = ..., attached: _Optional[bool] = ..., pool_valid: _Optional[bool] = ..., worker_id: _Optional[str] = ..., pool: _Optional[_Union[PoolHandle, _Mapping]] = ..., device_uuid: _Optional[str] = ...) -> None: ...

class RequestState(_message.Message):
    __slots__ = ("request_id", "chunks_committed", "chunks_protected", "tokens", "prompt_tokens", "parity_bytes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_PROTECTED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    chunks_committed: int
    chunks_protected: int
    tokens: int
    prompt_tokens: int
    parity_bytes: int
    def __init__(self, request_id: _Optional[str] = ..., chunks_committed: _Optional[int] = ..., chunks_protected: _Optional[int] = ..., tokens: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., parity_bytes: _Optional[int] = ...) -> None: ...

class GroupDescription(_message.Message):
    __slots__ = ("group", "world_size", "layout", "protection", "ranks", "requests", "parity_bytes", "pool_bytes", "parity_budget_bytes", "uid", "bytes_rebuilt", "chunks_rebuilt")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    PROTECTION_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PARITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    POOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARITY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    BYTES_REBUILT_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_REBUILT_FIELD_NUMBER: _ClassVar[int]
    group: str
    world_size: int
    layout: KVLayout
    protection: Protection
    ranks: _containers.RepeatedCompositeFieldContainer[RankState]
    requests: _containers.RepeatedCompositeFieldContainer[RequestState]
    parity_bytes: int
    pool_bytes: int
    parity_budget_bytes: int
    uid: str
    bytes_rebuilt: int
    chunks_rebuilt: int
    def __init__(self, group: _Optional[str] = ..., world_size: _Optional[int] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., protection: _Optional[_Union[Protection, _Mapping]] = ..., ranks: _Optional[_Iterable[_Union[RankState, _Mapping]]] = ..., requests: _Optional[_Iterable[_Union[RequestState, _Mapping]]] = ..., parity_bytes: _Optional[int] = ..., pool_bytes: _Optional[int] = ..., parity_budget_bytes: _Optional[int] = ..., uid: _Optional[str] = ..., bytes_rebuilt: _Optional[int] = ..., chunks_rebuilt: _Optional[int] = ...) -> None: ...

class ListGroupsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListGroupsResponse(_message.Message):
    __slots__ = ("groups",)
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, groups: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteGroupRequest(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: str
    def __init__(self, group: _Optional[str] = ...) -> None: ...

class DeleteGroupResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MarkLostRequest(_message.Message):
    __slots__ = ("group", "ranks", "reason")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    group: str
    ranks: _containers.RepeatedScalarFieldContainer[int]
    reason: str
    def __init__(self, group: _Optional[str] = ..., ranks: _Optional[_Iterable[int]] = ..., reason: _Optional[str] = ...) -> None: ...

class MarkLostResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PlanRecoveryRequest(_message.Message):
    __slots__ = ("group", "lost_ranks", "prefill_tokens_per_s", "rebuild_bytes_per_s")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    LOST_RANKS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    REBUILD_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    group: str
    lost_ranks: _containers.RepeatedScalarFieldContainer[int]
    prefill_tokens_per_s: float
    rebuild_bytes_per_s: float
    def __init__(self, group: _Optional[str] = ..., lost_ranks: _Optional[_Iterable[int]] = ..., prefill_tokens_per_s: _Optional[float] = ..., rebuild_bytes_per_s: _Optional[float] = ...) -> None: ...

class RequestPlan(_message.Message):
    __slots__ = ("request_id", "total_chunks", "recompute_chunks", "rebuild_chunks", "unprotected_chunks", "tail_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    REBUILD_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    UNPROTECTED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TAIL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    total_chunks: int
    recompute_chunks: int
    rebuild_chunks: _containers.RepeatedScalarFieldContainer[int]
    unprotected_chunks: _containers.RepeatedScalarFieldContainer[int]
    tail_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., total_chunks: _Optional[int] = ..., recompute_chunks: _Optional[int] = ..., rebuild_chunks: _Optional[_Iterable[int]] = ..., unprotected_chunks: _Optional[_Iterable[int]] = ..., tail_tokens: _Optional[int] = ...) -> None: ...

class RecoveryPlan(_message.Message):
    __slots__ = ("group", "lost_ranks", "requests", "estimated_seconds")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    LOST_RANKS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    group: str
    lost_ranks: _containers.RepeatedScalarFieldContainer[int]
    requests: _containers.RepeatedCompositeFieldContainer[RequestPlan]
    estimated_seconds: float
    def __init__(self, group: _Optional[str] = ..., lost_ranks: _Optional[_Iterable[int]] = ..., requests: _Optional[_Iterable[_Union[RequestPlan, _Mapping]]] = ..., estimated_seconds: _Optional[float] = ...) -> None: ...

class RebuildRequest(_message.Message):
    __slots__ = ("group", "lost_ranks", "request_ids", "first_chunk")
    class FirstChunkEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    GROUP_FIELD_NUMBER: _ClassVar[int]
    LOST_RANKS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    group: str
    lost_ranks: _containers.RepeatedScalarFieldContainer[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    first_chunk: _containers.ScalarMap[str, int]
    def __init__(self, group: _Optional[str] = ..., lost_ranks: _Optional[_Iterable[int]] = ..., request_ids: _Optional[_Iterable[str]] = ..., first_chunk: _Optional[_Mapping[str, int]] = ...) -> None: ...

class FailedChunk(_message.Message):
    __slots__ = ("chunk_index", "reason")
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    chunk_index: int
    reason: ChunkFailure
    def __init__(self, chunk_index: _Optional[int] = ..., reason: _Optional[_Union[ChunkFailure, str]] = ...) -> None: ...

class RequestRebuild(_message.Message):
    __slots__ = ("request_id", "rebuilt_chunks", "failed_chunks", "bytes_rebuilt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REBUILT_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    FAILED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_REBUILT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    rebuilt_chunks: _containers.RepeatedScalarFieldContainer[int]
    failed_chunks: _containers.RepeatedCompositeFieldContainer[FailedChunk]
    bytes_rebuilt: int
    def __init__(self, request_id: _Optional[str] = ..., rebuilt_chunks: _Optional[_Iterable[int]] = ..., failed_chunks: _Optional[_Iterable[_Union[FailedChunk, _Mapping]]] = ..., bytes_rebuilt: _Optional[int] = ...) -> None: ...

class RebuildReport(_message.Message):
    __slots__ = ("group", "requests", "bytes_rebuilt", "seconds")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_REBUILT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    group: str
    requests: _containers.RepeatedCompositeFieldContainer[RequestRebuild]
    bytes_rebuilt: int
    seconds: float
    def __init__(self, group: _Optional[str] = ..., requests: _Optional[_Iterable[_Union[RequestRebuild, _Mapping]]] = ..., bytes_rebuilt: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class StreamRebuildRequest(_message.Message):
    __slots__ = ("group", "lost_ranks", "rank", "request_ids", "first_chunk")
    class FirstChunkEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    GROUP_FIELD_NUMBER: _ClassVar[int]
    LOST_RANKS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    group: str
    lost_ranks: _containers.RepeatedScalarFieldContainer[int]
    rank: int
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    first_chunk: _containers.ScalarMap[str, int]
    def __init__(self, group: _Optional[str] = ..., lost_ranks: _Optional[_Iterable[int]] = ..., rank: _Optional[int] = ..., request_ids: _Optional[_Iterable[str]] = ..., first_chunk: _Optional[_Mapping[str, int]] = ...) -> None: ...

class RebuiltShardPiece(_message.Message):
    __slots__ = ("request_id", "chunk_index", "rank", "slots", "offset", "data", "shard_nbytes", "failure")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHARD_NBYTES_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    chunk_index: int
    rank: int
    slots: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    data: bytes
    shard_nbytes: int
    failure: ChunkFailure
    def __init__(self, request_id: _Optional[str] = ..., chunk_index: _Optional[int] = ..., rank: _Optional[int] = ..., slots: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., shard_nbytes: _Optional[int] = ..., failure: _Optional[_Union[ChunkFailure, str]] = ...) -> None: ...

class WatchHealthRequest(_message.Message):
    __slots__ = ("initial_state",)
    INITIAL_STATE_FIELD_NUMBER: _ClassVar[int]
    initial_state: bool
    def __init__(self, initial_state: _Optional[bool] = ...) -> None: ...

class HealthEvent(_message.Message):
    __slots__ = ("gpu_index", "gpu_uuid", "kind", "xid", "fatal", "message", "time", "node", "group", "rank")
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    XID_FIELD_NUMBER: _ClassVar[int]
    FATAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    gpu_index: int
    gpu_uuid: str
    kind: HealthKind
    xid: int
    fatal: bool
    message: str
    time: float
    node: str
    group: str
    rank: int
    def __init__(self, gpu_index: _Optional[int] = ..., gpu_uuid: _Optional[str] = ..., kind: _Optional[_Union[HealthKind, str]] = ..., xid: _Optional[int] = ..., fatal: _Optional[bool] = ..., message: _Optional[str] = ..., time: _Optional[float] = ..., node: _Optional[str] = ..., group: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class InjectFaultRequest(_message.Message):
    __slots__ = ("gpu_index", "kind", "xid", "message")
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    XID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    gpu_index: int
    kind: HealthKind
    xid: int
    message: str
    def __init__(self, gpu_index: _Optional[int] = ..., kind: _Optional[_Union[HealthKind, str]] = ..., xid: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class InjectFaultResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FlushRequest(_message.Message):
    __slots__ = ("group", "timeout_seconds")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    group: str
    timeout_seconds: float
    def __init__(self, group: _Optional[str] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class FlushResponse(_message.Message):
    __slots__ = ("drained", "chunks_queued")
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_QUEUED_FIELD_NUMBER: _ClassVar[int]
    drained: bool
    chunks_queued: int
    def __init__(self, drained: _Optional[bool] = ..., chunks_queued: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Stats(_message.Message):
    __slots__ = ("parity_bytes_held", "parity_budget_bytes", "pool_bytes_held", "chunks_protected", "chunks_unprotected", "chunks_queued", "evictions", "encode_bytes", "encode_seconds", "rebuild_bytes", "rebuild_seconds", "groups", "requests", "move_bytes_received", "moves_in_progress")
    PARITY_BYTES_HELD_FIELD_NUMBER: _ClassVar[int]
    PARITY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    POOL_BYTES_HELD_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_PROTECTED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_UNPROTECTED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_QUEUED_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REBUILD_BYTES_FIELD_NUMBER: _ClassVar[int]
    REBUILD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MOVE_BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    MOVES_IN_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    parity_bytes_held: int
    parity_budget_bytes: int
    pool_bytes_held: int
    chunks_protected: int
    chunks_unprotected: int
    chunks_queued: int
    evictions: int
    encode_bytes: int
    encode_seconds: float
    rebuild_bytes: int
    rebuild_seconds: float
    groups: int
    requests: int
    move_bytes_received: int
    moves_in_progress: int
    def __init__(self, parity_bytes_held: _Optional[int] = ..., parity_budget_bytes: _Optional[int] = ..., pool_bytes_held: _Optional[int] = ..., chunks_protected: _Optional[int] = ..., chunks_unprotected: _Optional[int] = ..., chunks_queued: _Optional[int] = ..., evictions: _Optional[int] = ..., encode_bytes: _Optional[int] = ..., encode_seconds: _Optional[float] = ..., rebuild_bytes: _Optional[int] = ..., rebuild_seconds: _Optional[float] = ..., groups: _Optional[int] = ..., requests: _Optional[int] = ..., move_bytes_received: _Optional[int] = ..., moves_in_progress: _Optional[int] = ...) -> None: ...

class MoveGroupRequest(_message.Message):
    __slots__ = ("group", "target", "target_server_name", "piece_bytes")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TARGET_SERVER_NAME_FIELD_NUMBER: _ClassVar[int]
    PIECE_BYTES_FIELD_NUMBER: _ClassVar[int]
    group: str
    target: str
    target_server_name: str
    piece_bytes: int
    def __init__(self, group: _Optional[str] = ..., target: _Optional[str] = ..., target_server_name: _Optional[str] = ..., piece_bytes: _Optional[int] = ...) -> None: ...

class MoveGroupReply(_message.Message):
    __slots__ = ("bytes_moved", "ranks_moved", "requests_moved", "resumed_from_bytes", "seconds")
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    RANKS_MOVED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_MOVED_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FROM_BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    bytes_moved: int
    ranks_moved: int
    requests_moved: int
    resumed_from_bytes: int
    seconds: float
    def __init__(self, bytes_moved: _Optional[int] = ..., ranks_moved: _Optional[int] = ..., requests_moved: _Optional[int] = ..., resumed_from_bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class MoveHeader(_message.Message):
    __slots__ = ("group", "uid", "world_size", "layout", "protection", "parity_budget_bytes", "pool_checksums", "source_node", "creator")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    PROTECTION_FIELD_NUMBER: _ClassVar[int]
    PARITY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    POOL_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NODE_FIELD_NUMBER: _ClassVar[int]
    CREATOR_FIELD_NUMBER: _ClassVar[int]
    group: str
    uid: str
    world_size: int
    layout: KVLayout
    protection: Protection
    parity_budget_bytes: int
    pool_checksums: _containers.RepeatedScalarFieldContainer[int]
    source_node: str
    creator: str
    def __init__(self, group: _Optional[str] = ..., uid: _Optional[str] = ..., world_size: _Optional[int] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., protection: _Optional[_Union[Protection, _Mapping]] = ..., parity_budget_bytes: _Optional[int] = ..., pool_checksums: _Optional[_Iterable[int]] = ..., source_node: _Optional[str] = ..., creator: _Optional[str] = ...) -> None: ...

class MovePiece(_message.Message):
    __slots__ = ("header", "offset", "data", "checksum", "ledger", "ledger_checksum", "commit")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    LEDGER_FIELD_NUMBER: _ClassVar[int]
    LEDGER_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    header: MoveHeader
    offset: int
    data: bytes
    checksum: int
    ledger: bytes
    ledger_checksum: int
    commit: bool
    def __init__(self, header: _Optional[_Union[MoveHeader, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., checksum: _Optional[int] = ..., ledger: _Optional[bytes] = ..., ledger_checksum: _Optional[int] = ..., commit: _Optional[bool] = ...) -> None: ...

class ReceiveGroupReply(_message.Message):
    __slots__ = ("received_bytes", "total_bytes", "complete")
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    received_bytes: int
    total_bytes: int
    complete: bool
    def __init__(self, received_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...

class MovedLedger(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[MovedRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[MovedRequest, _Mapping]]] = ...) -> None: ...

class MovedRequest(_message.Message):
    __slots__ = ("request_id", "token_ids", "prompt_tokens", "max_new_tokens", "chunks")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    prompt_tokens: int
    max_new_tokens: int
    chunks: _containers.RepeatedCompositeFieldContainer[MovedChunk]
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., prompt_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[MovedChunk, _Mapping]]] = ...) -> None: ...

class MovedChunk(_message.Message):
    __slots__ = ("chunk_index", "slots", "token_ids")
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    chunk_index: int
    slots: _containers.RepeatedScalarFieldContainer[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, chunk_index: _Optional[int] = ..., slots: _Optional[_Iterable[int]] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...
