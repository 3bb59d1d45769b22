from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TruncationDirection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRUNCATION_DIRECTION_RIGHT: _ClassVar[TruncationDirection]
    TRUNCATION_DIRECTION_LEFT: _ClassVar[TruncationDirection]

class LongDocuments(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LONG_DOCUMENTS_TRUNCATE: _ClassVar[LongDocuments]
    LONG_DOCUMENTS_CHUNK: _ClassVar[LongDocuments]
TRUNCATION_DIRECTION_RIGHT: TruncationDirection
TRUNCATION_DIRECTION_LEFT: TruncationDirection
LONG_DOCUMENTS_TRUNCATE: LongDocuments
LONG_DOCUMENTS_CHUNK: LongDocuments

class Document(_message.Message):
    __slots__ = ("id", "text")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class RerankRequest(_message.Message):
    __slots__ = ("query", "documents", "top_n", "raw_scores", "max_length", "truncation_direction", "long_documents", "max_chunks_per_doc", "chunk_overlap", "return_text", "instruction", "model")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORES_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_DIRECTION_FIELD_NUMBER: _ClassVar[int]
    LONG_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNKS_PER_DOC_FIELD_NUMBER: _ClassVar[int]
    CHUNK_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    RETURN_TEXT_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    query: str
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    top_n: int
    raw_scores: bool
    max_length: int
    truncation_direction: TruncationDirection
    long_documents: LongDocuments
    max_chunks_per_doc: int
    chunk_overlap: int
    return_text: bool
    instruction: str
    model: str
    def __init__(self, query: _Optional[str] = ..., documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ..., top_n: _Optional[int] = ..., raw_scores: _Optional[bool] = ..., max_length: _Optional[int] = ..., truncation_direction: _Optional[_Union[TruncationDirection, str]] = ..., long_documents: _Optional[_Union[LongDocuments, str]] = ..., max_chunks_per_doc: _Optional[int] = ..., chunk_overlap: _Optional[int] = ..., return_text: _Optional[bool] = ..., instruction: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("index", "id", "score", "text")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    index: int
    id: str
    score: float
    text: str
    def __init__(self, index: _Optional[int] = ..., id: _Optional[str] = ..., score: _Optional[float] = ..., text: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("pairs", "chunks", "tokens", "batches", "queue_ns", "tokenization_ns", "inference_ns", "total_ns", "cached_pairs")
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZATION_NS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_NS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PAIRS_FIELD_NUMBER: _ClassVar[int]
    pairs: int
    chunks: int
    tokens: int
    batches: int
    queue_ns: int
    tokenization_ns: int
    inference_ns: int
    total_ns: int
    cached_pairs: int
    def __init__(self, pairs: _Optional[int] = ..., chunks: _Optional[int] = ..., tokens: _Optional[int] = ..., batches: _Optional[int] = ..., queue_ns: _Optional[int] = ..., tokenization_ns: _Optional[int] = ..., inference_ns: _Optional[int] = ..., total_ns: _Optional[int] = ..., cached_pairs: _Optional[int] = ...) -> None: ...

class RerankResponse(_message.Message):
    __slots__ = ("results", "usage", "model_id")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Result]
    usage: Usage
    model_id: str
    def __init__(self, results: _Optional[_Iterable[_Union[Result, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., model_id: _Optional[str] = ...) -> None: ...

class RerankStreamRequest(_message.Message):
    __slots__ = ("query", "documents", "top_n", "raw_scores", "max_length", "truncation_direction", "long_documents", "max_chunks_per_doc", "chunk_overlap", "return_text", "instruction", "model")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORES_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_DIRECTION_FIELD_NUMBER: _ClassVar[int]
    LONG_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNKS_PER_DOC_FIELD_NUMBER: _ClassVar[int]
    CHUNK_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    RETURN_TEXT_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    query: str
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    top_n: int
    raw_scores: bool
    max_length: int
    truncation_direction: TruncationDirection
    long_documents: LongDocuments
    max_chunks_per_doc: int
    chunk_overlap: int
    return_text: bool
    instruction: str
    model: str
    def __init__(self, query: _Optional[str] = ..., documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ..., top_n: _Optional[int] = ..., raw_scores: _Optional[bool] = ..., max_length: _Optional[int] = ..., truncation_direction: _Optional[_Union[TruncationDirection, str]] = ..., long_documents: _Optional[_Union[LongDocuments, str]] = ..., max_chunks_per_doc: _Optional[int] = ..., chunk_overlap: _Optional[int] = ..., return_text: _Optional[bool] = ..., instruction: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class BatchScores(_message.Message):
    __slots__ = ("batch", "results")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    batch: int
    results: _containers.RepeatedCompositeFieldContainer[Result]
    def __init__(self, batch: _Optional[int] = ..., results: _Optional[_Iterable[_Union[Result, _Mapping]]] = ...) -> None: ...

class FinalRanking(_message.Message):
    __slots__ = ("results", "usage", "model_id")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Result]
    usage: Usage
    model_id: str
    def __init__(self, results: _Optional[_Iterable[_Union[Result, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., model_id: _Optional[str] = ...) -> None: ...

class RerankStreamResponse(_message.Message):
    __slots__ = ("batch_scores", "final")
    BATCH_SCORES_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    batch_scores: BatchScores
    final: FinalRanking
    def __init__(self, batch_scores: _Optional[_Union[BatchScores, _Mapping]] = ..., final: _Optional[_Union[FinalRanking, _Mapping]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("texts", "max_length", "truncation_direction", "model")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_DIRECTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    max_length: int
    truncation_direction: TruncationDirection
    model: str
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., max_length: _Optional[int] = ..., truncation_direction: _Optional[_Union[TruncationDirection, str]] = ..., model: _Optional[str] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "dims", "model_id", "usage")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    dims: int
    model_id: str
    usage: Usage
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., dims: _Optional[int] = ..., model_id: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BatchingLimits(_message.Message):
    __slots__ = ("max_batch_tokens", "max_batch_pairs", "max_queued_pairs", "max_documents_per_request", "max_chunks_per_doc", "batch_workers")
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_PAIRS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_PAIRS_FIELD_NUMBER: _ClassVar[int]
    MAX_DOCUMENTS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNKS_PER_DOC_FIELD_NUMBER: _ClassVar[int]
    BATCH_WORKERS_FIELD_NUMBER: _ClassVar[int]
    max_batch_tokens: int
    max_batch_pairs: int
    max_queued_pairs: int
    max_documents_per_request: int
    max_chunks_per_doc: int
    batch_workers: int
    def __init__(self, max_batch_tokens: _Optional[int] = ..., max_batch_pairs: _Optional[int] = ..., max_queued_pairs: _Optional[int] = ..., max_documents_per_request: _Optional[int] = ..., max_chunks_per_doc: _Optional[int] = ..., batch_workers: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_id", "model_revision", "model_kind", "engine", "precision", "device", "max_length", "num_labels", "limits", "server_version", "engine_notes", "embedding_model", "compiled", "selection", "model_family", "instruction", "models", "score_cache", "tokenize_in", "tokenizer_workers")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    MODEL_KIND_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    NUM_LABELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_NOTES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_MODEL_FIELD_NUMBER: _ClassVar[int]
    COMPILED_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FAMILY_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SCORE_CACHE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZE_IN_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_WORKERS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_revision: str
    model_kind: str
    engine: str
    precision: str
    device: str
    max_length: int
    num_labels: int
    limits: BatchingLimits
    server_version: str
    engine_notes: _containers.RepeatedScalarFieldContainer[str]
    embedding_model: EmbeddingModelInfo
    compiled: bool
    selection: EngineSelection
    model_family: str
    instruction: str
    models: _containers.RepeatedCompositeFieldContainer[ServedModel]
    score_cache: ScoreCacheInfo
    tokenize_in: str
    tokenizer_workers: int
    def __init__(self, model_id: _Optional[str] = ..., model_revision: _Optional[str] = ..., model_kind: _Optional[str] = ..., engine: _Optional[str] = ..., precision: _Optional[str] = ..., device: _Optional[str] = ..., max_length: _Optional[int] = ..., num_labels: _Optional[int] = ..., limits: _Optional[_Union[BatchingLimits, _Mapping]] = ..., server_version: _Optional[str] = ..., engine_notes: _Optional[_Iterable[str]] = ..., embedding_model: _Optional[_Union[EmbeddingModelInfo, _Mapping]] = ..., compiled: _Optional[bool] = ..., selection: _Optional[_Union[EngineSelection, _Mapping]] = ..., model_family: _Optional[str] = ..., instruction: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ServedModel, _Mapping]]] = ..., score_cache: _Optional[_Union[ScoreCacheInfo, _Mapping]] = ..., tokenize_in: _Optional[str] = ..., tokenizer_workers: _Optional[int] = ...) -> None: ...

class ServedModel(_message.Message):
    __slots__ = ("name", "service", "is_default", "model_id", "model_kind", "model_family", "engine", "precision", "device", "compiled", "max_length", "max_batch_tokens", "max_batch_pairs", "batch_workers", "score_cache", "dims", "pooling", "normalized")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FAMILY_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    COMPILED_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_PAIRS_FIELD_NUMBER: _ClassVar[int]
    BATCH_WORKERS_FIELD_NUMBER: _ClassVar[int]
    SCORE_CACHE_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    name: str
    service: str
    is_default: bool
    model_id: str
    model_kind: str
    model_family: str
    engine: str
    precision: str
    device: str
    compiled: bool
    max_length: int
    max_batch_tokens: int
    max_batch_pairs: int
    batch_workers: int
    score_cache: ScoreCacheInfo
    dims: int
    pooling: str
    normalized: bool
    def __init__(self, name: _Optional[str] = ..., service: _Optional[str] = ..., is_default: _Optional[bool] = ..., model_id: _Optional[str] = ..., model_kind: _Optional[str] = ..., model_family: _Optional[str] = ..., engine: _Optional[str] = ..., precision: _Optional[str] = ..., device: _Optional[str] = ..., compiled: _Optional[bool] = ..., max_length: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., max_batch_pairs: _Optional[int] = ..., batch_workers: _Optional[int] = ..., score_cache: _Optional[_Union[ScoreCacheInfo, _Mapping]] = ..., dims: _Optional[int] = ..., pooling: _Optional[str] = ..., normalized: _Optional[bool] = ...) -> None: ...

class ScoreCacheInfo(_message.Message):
    __slots__ = ("serves", "max_pairs", "pairs", "why_not_serving")
    SERVES_FIELD_NUMBER: _ClassVar[int]
    MAX_PAIRS_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    WHY_NOT_SERVING_FIELD_NUMBER: _ClassVar[int]
    serves: bool
    max_pairs: int
    pairs: int
    why_not_serving: str
    def __init__(self, serves: _Optional[bool] = ..., max_pairs: _Optional[int] = ..., pairs: _Optional[int] = ..., why_not_serving: _Optional[str] = ...) -> None: ...

class EngineSelection(_message.Message):
    __slots__ = ("from_cache", "lossy_margin", "speedup_over_lossless", "timings", "hardware")
    FROM_CACHE_FIELD_NUMBER: _ClassVar[int]
    LOSSY_MARGIN_FIELD_NUMBER: _ClassVar[int]
    SPEEDUP_OVER_LOSSLESS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    from_cache: bool
    lossy_margin: float
    speedup_over_lossless: float
    timings: _containers.RepeatedCompositeFieldContainer[CandidateTiming]
    hardware: str
    def __init__(self, from_cache: _Optional[bool] = ..., lossy_margin: _Optional[float] = ..., speedup_over_lossless: _Optional[float] = ..., timings: _Optional[_Iterable[_Union[CandidateTiming, _Mapping]]] = ..., hardware: _Optional[str] = ...) -> None: ...

class CandidateTiming(_message.Message):
    __slots__ = ("candidate", "rows_per_second")
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    candidate: str
    rows_per_second: float
    def __init__(self, candidate: _Optional[str] = ..., rows_per_second: _Optional[float] = ...) -> None: ...

class EmbeddingModelInfo(_message.Message):
    __slots__ = ("model_id", "dims", "pooling", "normalized", "max_length", "engine", "precision", "device", "compiled", "selection")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    COMPILED_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    dims: int
    pooling: str
    normalized: bool
    max_length: int
    engine: str
    precision: str
    device: str
    compiled: bool
    selection: EngineSelection
    def __init__(self, model_id: _Optional[str] = ..., dims: _Optional[int] = ..., pooling: _Optional[str] = ..., normalized: _Optional[bool] = ..., max_length: _Optional[int] = ..., engine: _Optional[str] = ..., precision: _Optional[str] = ..., device: _Optional[str] = ..., compiled: _Optional[bool] = ..., selection: _Optional[_Union[EngineSelection, _Mapping]] = ...) -> None: ...
