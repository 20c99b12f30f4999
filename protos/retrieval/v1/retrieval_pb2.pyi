from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MatchRequest(_message.Message):
    __slots__ = ("tenant", "image", "top_k", "target_far")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TARGET_FAR_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    image: bytes
    top_k: int
    target_far: float
    def __init__(self, tenant: _Optional[str] = ..., image: _Optional[bytes] = ..., top_k: _Optional[int] = ..., target_far: _Optional[float] = ...) -> None: ...

class Neighbor(_message.Message):
    __slots__ = ("item_id", "label", "similarity")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    label: str
    similarity: float
    def __init__(self, item_id: _Optional[str] = ..., label: _Optional[str] = ..., similarity: _Optional[float] = ...) -> None: ...

class MatchResponse(_message.Message):
    __slots__ = ("decision_id", "matched", "label", "item_id", "similarity", "distance", "threshold", "target_far", "neighbors", "gallery_size")
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    MATCHED_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TARGET_FAR_FIELD_NUMBER: _ClassVar[int]
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    GALLERY_SIZE_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    matched: bool
    label: str
    item_id: str
    similarity: float
    distance: float
    threshold: float
    target_far: float
    neighbors: _containers.RepeatedCompositeFieldContainer[Neighbor]
    gallery_size: int
    def __init__(self, decision_id: _Optional[str] = ..., matched: _Optional[bool] = ..., label: _Optional[str] = ..., item_id: _Optional[str] = ..., similarity: _Optional[float] = ..., distance: _Optional[float] = ..., threshold: _Optional[float] = ..., target_far: _Optional[float] = ..., neighbors: _Optional[_Iterable[_Union[Neighbor, _Mapping]]] = ..., gallery_size: _Optional[int] = ...) -> None: ...

class MatchBatchRequest(_message.Message):
    __slots__ = ("tenant", "images", "top_k", "target_far")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TARGET_FAR_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    images: _containers.RepeatedScalarFieldContainer[bytes]
    top_k: int
    target_far: float
    def __init__(self, tenant: _Optional[str] = ..., images: _Optional[_Iterable[bytes]] = ..., top_k: _Optional[int] = ..., target_far: _Optional[float] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class MatchBatchResult(_message.Message):
    __slots__ = ("match", "error")
    MATCH_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    match: MatchResponse
    error: ItemError
    def __init__(self, match: _Optional[_Union[MatchResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class MatchBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[MatchBatchResult]
    def __init__(self, results: _Optional[_Iterable[_Union[MatchBatchResult, _Mapping]]] = ...) -> None: ...

class EnrollItem(_message.Message):
    __slots__ = ("item_id", "label", "image")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    label: str
    image: bytes
    def __init__(self, item_id: _Optional[str] = ..., label: _Optional[str] = ..., image: _Optional[bytes] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("tenant", "items", "replace")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    items: _containers.RepeatedCompositeFieldContainer[EnrollItem]
    replace: bool
    def __init__(self, tenant: _Optional[str] = ..., items: _Optional[_Iterable[_Union[EnrollItem, _Mapping]]] = ..., replace: _Optional[bool] = ...) -> None: ...

class EnrollResult(_message.Message):
    __slots__ = ("item_id", "ok", "error")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    ok: bool
    error: ItemError
    def __init__(self, item_id: _Optional[str] = ..., ok: _Optional[bool] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("results", "gallery_size")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    GALLERY_SIZE_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EnrollResult]
    gallery_size: int
    def __init__(self, results: _Optional[_Iterable[_Union[EnrollResult, _Mapping]]] = ..., gallery_size: _Optional[int] = ...) -> None: ...

class RemoveRequest(_message.Message):
    __slots__ = ("tenant", "item_ids")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tenant: _Optional[str] = ..., item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RemoveResponse(_message.Message):
    __slots__ = ("removed", "not_found", "gallery_size")
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    GALLERY_SIZE_FIELD_NUMBER: _ClassVar[int]
    removed: int
    not_found: _containers.RepeatedScalarFieldContainer[str]
    gallery_size: int
    def __init__(self, removed: _Optional[int] = ..., not_found: _Optional[_Iterable[str]] = ..., gallery_size: _Optional[int] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("tenant", "decision_id", "is_same")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    IS_SAME_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    decision_id: str
    is_same: bool
    def __init__(self, tenant: _Optional[str] = ..., decision_id: _Optional[str] = ..., is_same: _Optional[bool] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("matched",)
    MATCHED_FIELD_NUMBER: _ClassVar[int]
    matched: bool
    def __init__(self, matched: _Optional[bool] = ...) -> None: ...

class GetTenantRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class TenantInfo(_message.Message):
    __slots__ = ("tenant", "gallery_size", "target_far", "threshold", "stats")
    class StatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    GALLERY_SIZE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FAR_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    gallery_size: int
    target_far: float
    threshold: float
    stats: _containers.ScalarMap[str, float]
    def __init__(self, tenant: _Optional[str] = ..., gallery_size: _Optional[int] = ..., target_far: _Optional[float] = ..., threshold: _Optional[float] = ..., stats: _Optional[_Mapping[str, float]] = ...) -> None: ...

class CreateTenantRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class CreateTenantResponse(_message.Message):
    __slots__ = ("tenant", "api_key")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    api_key: str
    def __init__(self, tenant: _Optional[str] = ..., api_key: _Optional[str] = ...) -> None: ...

class DeleteTenantRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class DeleteTenantResponse(_message.Message):
    __slots__ = ("removed_items",)
    REMOVED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    removed_items: int
    def __init__(self, removed_items: _Optional[int] = ...) -> None: ...

class ListTenantsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ("tenants",)
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tenants: _Optional[_Iterable[str]] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ("model_path", "calibration_path")
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_PATH_FIELD_NUMBER: _ClassVar[int]
    model_path: str
    calibration_path: str
    def __init__(self, model_path: _Optional[str] = ..., calibration_path: _Optional[str] = ...) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("model_sha256", "calibration_sha256", "reembedded_items", "provider")
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_SHA256_FIELD_NUMBER: _ClassVar[int]
    REEMBEDDED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    model_sha256: str
    calibration_sha256: str
    reembedded_items: int
    provider: str
    def __init__(self, model_sha256: _Optional[str] = ..., calibration_sha256: _Optional[str] = ..., reembedded_items: _Optional[int] = ..., provider: _Optional[str] = ...) -> None: ...
