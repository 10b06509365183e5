"""bgqueue: the background-task model of Apple's BackgroundTasks and HarmonyOS's
Background Tasks Kit, as a distributed job queue on Celery + Redis."""

from bgqueue.app import BackgroundApp
from bgqueue.errors import (
    BackgroundTaskError,
    ContinuousTaskVerificationFailed,
    EfficiencyResourceVerificationFailed,
    ImmediateRunIneligible,
    NotPermitted,
    NotSystemApp,
    ParameterError,
    PermissionDenied,
    ServiceError,
    StartWorkFailed,
    TooManyPendingTaskRequests,
    TransientTaskCallerVerificationFailed,
    TransientTaskVerificationFailed,
    Unavailable,
    WorkInfoCheckFailed,
)
from bgqueue.model.limits import Limits
from bgqueue.model.modes import BackgroundMode
from bgqueue.model.requests import (
    AppRefreshTaskRequest,
    BGTaskRequest,
    ContinuedProcessingStrategy,
    ContinuedProcessingTaskRequest,
    FileProtectionType,
    HealthResearchTaskRequest,
    ProcessingTaskRequest,
    TaskRecord,
)
from bgqueue.runtime.tasks import (
    AppRefreshTask,
    BGTask,
    ContinuedProcessingTask,
    HealthResearchTask,
    ProcessingTask,
    Progress,
)

__all__ = [
    "AppRefreshTask",
    "AppRefreshTaskRequest",
    "BGTask",
    "BGTaskRequest",
    "BackgroundApp",
    "BackgroundMode",
    "BackgroundTaskError",
    "ContinuedProcessingStrategy",
    "ContinuedProcessingTask",
    "ContinuedProcessingTaskRequest",
    "ContinuousTaskVerificationFailed",
    "EfficiencyResourceVerificationFailed",
    "FileProtectionType",
    "HealthResearchTask",
    "HealthResearchTaskRequest",
    "ImmediateRunIneligible",
    "Limits",
    "NotPermitted",
    "NotSystemApp",
    "ParameterError",
    "PermissionDenied",
    "ProcessingTask",
    "ProcessingTaskRequest",
    "Progress",
    "ServiceError",
    "StartWorkFailed",
    "TaskRecord",
    "TooManyPendingTaskRequests",
    "TransientTaskCallerVerificationFailed",
    "TransientTaskVerificationFailed",
    "Unavailable",
    "WorkInfoCheckFailed",
]

# -- transient delays --
from bgqueue.transient import DelaySuspendInfo, TransientTaskInfo  # noqa: E402

__all__ += ["DelaySuspendInfo", "TransientTaskInfo"]

# -- continuous tasks --
from bgqueue.continuous import (  # noqa: E402
    ContinuousTask,
    ContinuousTaskCancelInfo,
    ContinuousTaskCancelReason,
    ContinuousTaskInfo,
)

__all__ += [
    "ContinuousTask",
    "ContinuousTaskCancelInfo",
    "ContinuousTaskCancelReason",
    "ContinuousTaskInfo",
]

# -- efficiency resources --
from bgqueue.efficiency import (  # noqa: E402
    EfficiencyResourcesInfo,
    EfficiencyResourcesRequest,
    ResourceType,
)

__all__ += ["EfficiencyResourcesInfo", "EfficiencyResourcesRequest", "ResourceType"]

# -- work scheduler --
from bgqueue.works import (  # noqa: E402
    BatteryStatus,
    ChargingType,
    NetworkType,
    StorageRequest,
    WorkInfo,
    WorkSchedulerExtension,
)

__all__ += [
    "BatteryStatus",
    "ChargingType",
    "NetworkType",
    "StorageRequest",
    "WorkInfo",
    "WorkSchedulerExtension",
]
