"""Background modes an app declares for continuous tasks (HarmonyOS BackgroundMode)."""

from __future__ import annotations

from enum import IntEnum


class BackgroundMode(IntEnum):
    """HarmonyOS continuous-task modes, with the platform's numeric values."""

    DATA_TRANSFER = 1
    AUDIO_PLAYBACK = 2
    AUDIO_RECORDING = 3
    LOCATION = 4
    BLUETOOTH_INTERACTION = 5
    MULTI_DEVICE_CONNECTION = 6
    WIFI_INTERACTION = 7
    VOIP = 8
    TASK_KEEPING = 9


SYSTEM_ONLY_MODES = frozenset({BackgroundMode.WIFI_INTERACTION, BackgroundMode.VOIP})
