from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HelloRequest(_message.Message):
    __slots__ = ("site", "version", "can_offer_initial", "inbound")
    SITE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CAN_OFFER_INITIAL_FIELD_NUMBER: _ClassVar[int]
    INBOUND_FIELD_NUMBER: _ClassVar[int]
    site: str
    version: str
    can_offer_initial: bool
    inbound: str
    def __init__(self, site: _Optional[str] = ..., version: _Optional[str] = ..., can_offer_initial: _Optional[bool] = ..., inbound: _Optional[str] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("job_id", "total_rounds", "chunk_bytes", "version", "evaluates_after", "workflow", "best_metric", "served_model_json", "update_compression", "model_compression")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EVALUATES_AFTER_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    BEST_METRIC_FIELD_NUMBER: _ClassVar[int]
    SERVED_MODEL_JSON_FIELD_NUMBER: _ClassVar[int]
    UPDATE_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    total_rounds: int
    chunk_bytes: int
    version: str
    evaluates_after: bool
    workflow: str
    best_metric: str
    served_model_json: str
    update_compression: str
    model_compression: str
    def __init__(self, job_id: _Optional[str] = ..., total_rounds: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., version: _Optional[str] = ..., evaluates_after: _Optional[bool] = ..., workflow: _Optional[str] = ..., best_metric: _Optional[str] = ..., served_model_json: _Optional[str] = ..., update_compression: _Optional[str] = ..., model_compression: _Optional[str] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("site", "wait_seconds", "can_offer_initial", "holds_update", "aggregates")
    SITE_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CAN_OFFER_INITIAL_FIELD_NUMBER: _ClassVar[int]
    HOLDS_UPDATE_FIELD_NUMBER: _ClassVar[int]
    AGGREGATES_FIELD_NUMBER: _ClassVar[int]
    site: str
    wait_seconds: float
    can_offer_initial: bool
    holds_update: str
    aggregates: bool
    def __init__(self, site: _Optional[str] = ..., wait_seconds: _Optional[float] = ..., can_offer_initial: _Optional[bool] = ..., holds_update: _Optional[str] = ..., aggregates: _Optional[bool] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("kind", "round", "attempt", "total_rounds", "start_round", "task_name", "manifest_json", "job_id", "message", "nonce", "task_id", "model", "aggregator", "peers_json", "transfer_id", "model_transfer", "model_sender", "inputs_json", "direct_json")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        WAIT: _ClassVar[Task.Kind]
        TRAIN: _ClassVar[Task.Kind]
        END: _ClassVar[Task.Kind]
        OFFER_INITIAL: _ClassVar[Task.Kind]
        RESEND: _ClassVar[Task.Kind]
        EVALUATE: _ClassVar[Task.Kind]
        SUBMIT_MODEL: _ClassVar[Task.Kind]
        AGGREGATE: _ClassVar[Task.Kind]
    WAIT: Task.Kind
    TRAIN: Task.Kind
    END: Task.Kind
    OFFER_INITIAL: Task.Kind
    RESEND: Task.Kind
    EVALUATE: Task.Kind
    SUBMIT_MODEL: Task.Kind
    AGGREGATE: Task.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    START_ROUND_FIELD_NUMBER: _ClassVar[int]
    TASK_NAME_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_FIELD_NUMBER: _ClassVar[int]
    PEERS_JSON_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_TRANSFER_FIELD_NUMBER: _ClassVar[int]
    MODEL_SENDER_FIELD_NUMBER: _ClassVar[int]
    INPUTS_JSON_FIELD_NUMBER: _ClassVar[int]
    DIRECT_JSON_FIELD_NUMBER: _ClassVar[int]
    kind: Task.Kind
    round: int
    attempt: int
    total_rounds: int
    start_round: int
    task_name: str
    manifest_json: str
    job_id: str
    message: str
    nonce: str
    task_id: str
    model: str
    aggregator: str
    peers_json: str
    transfer_id: str
    model_transfer: str
    model_sender: str
    inputs_json: str
    direct_json: str
    def __init__(self, kind: _Optional[_Union[Task.Kind, str]] = ..., round: _Optional[int] = ..., attempt: _Optional[int] = ..., total_rounds: _Optional[int] = ..., start_round: _Optional[int] = ..., task_name: _Optional[str] = ..., manifest_json: _Optional[str] = ..., job_id: _Optional[str] = ..., message: _Optional[str] = ..., nonce: _Optional[str] = ..., task_id: _Optional[str] = ..., model: _Optional[str] = ..., aggregator: _Optional[str] = ..., peers_json: _Optional[str] = ..., transfer_id: _Optional[str] = ..., model_transfer: _Optional[str] = ..., model_sender: _Optional[str] = ..., inputs_json: _Optional[str] = ..., direct_json: _Optional[str] = ...) -> None: ...

class UploadBegin(_message.Message):
    __slots__ = ("site", "round", "attempt", "initial", "manifest_json", "nonce", "task_id")
    SITE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    INITIAL_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    site: str
    round: int
    attempt: int
    initial: bool
    manifest_json: str
    nonce: str
    task_id: str
    def __init__(self, site: _Optional[str] = ..., round: _Optional[int] = ..., attempt: _Optional[int] = ..., initial: _Optional[bool] = ..., manifest_json: _Optional[str] = ..., nonce: _Optional[str] = ..., task_id: _Optional[str] = ...) -> None: ...

class UploadState(_message.Message):
    __slots__ = ("upload_id", "offsets")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    offsets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, upload_id: _Optional[str] = ..., offsets: _Optional[_Iterable[int]] = ...) -> None: ...

class UploadAck(_message.Message):
    __slots__ = ("offset",)
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    offset: int
    def __init__(self, offset: _Optional[int] = ...) -> None: ...

class UploadCommit(_message.Message):
    __slots__ = ("upload_id", "shard_digests", "envelope_json")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_JSON_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    shard_digests: _containers.RepeatedScalarFieldContainer[str]
    envelope_json: str
    def __init__(self, upload_id: _Optional[str] = ..., shard_digests: _Optional[_Iterable[str]] = ..., envelope_json: _Optional[str] = ...) -> None: ...

class CommitReply(_message.Message):
    __slots__ = ("round", "message")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    round: int
    message: str
    def __init__(self, round: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("site", "round", "shard", "offset", "model", "file", "folder", "encoding")
    SITE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    FOLDER_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    site: str
    round: int
    shard: int
    offset: int
    model: str
    file: str
    folder: str
    encoding: str
    def __init__(self, site: _Optional[str] = ..., round: _Optional[int] = ..., shard: _Optional[int] = ..., offset: _Optional[int] = ..., model: _Optional[str] = ..., file: _Optional[str] = ..., folder: _Optional[str] = ..., encoding: _Optional[str] = ...) -> None: ...

class ResultRequest(_message.Message):
    __slots__ = ("site", "round", "task_id", "envelope_json")
    SITE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_JSON_FIELD_NUMBER: _ClassVar[int]
    site: str
    round: int
    task_id: str
    envelope_json: str
    def __init__(self, site: _Optional[str] = ..., round: _Optional[int] = ..., task_id: _Optional[str] = ..., envelope_json: _Optional[str] = ...) -> None: ...

class LogRequest(_message.Message):
    __slots__ = ("site", "round", "records_json")
    SITE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    RECORDS_JSON_FIELD_NUMBER: _ClassVar[int]
    site: str
    round: int
    records_json: str
    def __init__(self, site: _Optional[str] = ..., round: _Optional[int] = ..., records_json: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("status_json",)
    STATUS_JSON_FIELD_NUMBER: _ClassVar[int]
    status_json: str
    def __init__(self, status_json: _Optional[str] = ...) -> None: ...

class RelayOpen(_message.Message):
    __slots__ = ("site", "transfer_id", "header", "records", "max_bytes")
    SITE_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    site: str
    transfer_id: str
    header: bytes
    records: int
    max_bytes: int
    def __init__(self, site: _Optional[str] = ..., transfer_id: _Optional[str] = ..., header: _Optional[bytes] = ..., records: _Optional[int] = ..., max_bytes: _Optional[int] = ...) -> None: ...

class RelayState(_message.Message):
    __slots__ = ("transfer_id", "records", "bytes")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    records: int
    bytes: int
    def __init__(self, transfer_id: _Optional[str] = ..., records: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class RelayCommit(_message.Message):
    __slots__ = ("site", "transfer_id", "envelope_json", "direct", "bytes")
    SITE_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_JSON_FIELD_NUMBER: _ClassVar[int]
    DIRECT_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    site: str
    transfer_id: str
    envelope_json: str
    direct: bool
    bytes: int
    def __init__(self, site: _Optional[str] = ..., transfer_id: _Optional[str] = ..., envelope_json: _Optional[str] = ..., direct: _Optional[bool] = ..., bytes: _Optional[int] = ...) -> None: ...

class RelayRequest(_message.Message):
    __slots__ = ("site", "transfer_id", "from_record")
    SITE_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_RECORD_FIELD_NUMBER: _ClassVar[int]
    site: str
    transfer_id: str
    from_record: int
    def __init__(self, site: _Optional[str] = ..., transfer_id: _Optional[str] = ..., from_record: _Optional[int] = ...) -> None: ...

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
