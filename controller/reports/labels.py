"""Japanese / English labels of event types, directions and loan states, as registers print them."""

from __future__ import annotations

EVENT_LABELS: dict[str, tuple[str, str]] = {
    "door.access_granted": ("通行許可", "access granted"),
    "door.access_denied": ("通行拒否", "access denied"),
    "door.opened": ("開扉", "opened"),
    "door.closed": ("閉扉", "closed"),
    "door.alarm": ("警報", "alarm"),
    "door.alarm_cleared": ("警報解除", "alarm cleared"),
    "door.unlocked": ("解錠", "unlocked"),
    "door.mode_changed": ("動作モード変更", "mode changed"),
    "key.taken": ("鍵の貸出", "key taken"),
    "key.returned": ("鍵の返却", "key returned"),
    "login.granted": ("ログイン", "login"),
    "login.denied": ("ログイン拒否", "login denied"),
    "login.notice_shown": ("注意喚起の表示", "notice shown"),
    "session.locked": ("画面ロック", "session locked"),
    "session.unlocked": ("ロック解除", "session unlocked"),
    "session.ended": ("ログオフ", "session ended"),
    "session.lock_failed": ("ロック失敗", "lock failed"),
    "usb.inserted": ("USB接続", "USB inserted"),
    "usb.allowed": ("USB許可", "USB allowed"),
    "usb.blocked": ("USB遮断", "USB blocked"),
    "usb.rejected": ("USB拒否", "USB rejected"),
    "usb.unreadable": ("USB読取不能", "USB unreadable"),
    "usb.removed": ("USB取外し", "USB removed"),
    "usb.readonly_applied": ("読取専用に設定", "set read-only"),
    "usb.write_attempt": ("書込みの検知", "write attempt"),
    "media.lend": ("媒体の貸出", "medium lent"),
    "media.return": ("媒体の返却", "medium returned"),
    "media.revoke": ("媒体貸出の取消", "medium loan revoked"),
    "admin": ("管理操作", "admin change"),
}

DIRECTIONS: dict[str, tuple[str, str]] = {"entry": ("入室", "in"), "exit": ("退室", "out"), "both": ("", "")}

LOAN_STATES: dict[str, tuple[str, str]] = {
    "overdue": ("延滞", "overdue"),
    "open": ("貸出中", "out"),
    "returned": ("返却済", "returned"),
    "return_only": ("貸出記録なしの返却", "return without loan"),
    "revoked": ("取消", "revoked"),
}

# Where a registered medium is (電子媒体台帳): in the cabinet, out on a loan, or taken out of use.
MEDIUM_STATES: dict[str, tuple[str, str]] = {
    "overdue": ("延滞", "overdue"),
    "on_loan": ("貸出中", "on loan"),
    "reserved": ("貸出予約", "reserved"),
    "in_store": ("保管中", "in store"),
    "lost": ("紛失", "lost"),
    "retired": ("使用停止", "retired"),
    "disposed": ("廃棄済", "disposed"),
}

MEDIUM_KINDS: dict[str, tuple[str, str]] = {
    "usb_memory": ("USBメモリ", "USB memory"),
    "usb_disk": ("外付けディスク", "external disk"),
    "sd_card": ("SDカード", "SD card"),
    "other": ("その他", "other"),
}

CATEGORIES: dict[str, tuple[str, str]] = {
    "room": ("入退室", "room"),
    "locker": ("ロッカー", "locker"),
    "key_cabinet": ("鍵保管庫", "key cabinet"),
    "door": ("扉", "door"),
    "key": ("鍵", "key"),
    "visit": ("来訪", "visit"),
    "login": ("ログイン", "login"),
    "usb": ("USB", "USB"),
    "media": ("電子媒体", "media"),
    "admin": ("管理操作", "admin"),
}


def both(pair: tuple[str, str]) -> str:
    """Return a label as registers print it: `日本語 / English` (the Japanese alone when both read the same)."""
    ja, en = pair
    if not en or ja == en:
        return ja
    if not ja:
        return en
    return f"{ja} / {en}"


def event_label(event_type: str) -> str:
    """Return the bilingual label of an event type (the type itself when it has none)."""
    found = EVENT_LABELS.get(event_type)
    return both(found) if found else event_type
