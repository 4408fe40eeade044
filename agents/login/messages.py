"""What the person at the terminal reads: one entry per login reason, Japanese first, then English.

Each entry says what happened and what to do. ``unknown_user`` and ``not_designated`` deliberately read
the same, so the login prompt does not tell a stranger which account names exist; the event keeps the
precise reason for the administrators.
"""

from __future__ import annotations

from typing import Literal

Lang = Literal["ja", "en"]

_NOT_PERMITTED = (
    "このアカウントはこの端末を利用できません。管理者に連絡してください。",
    "This account may not use this terminal. Contact your administrator.",
)

MESSAGES: dict[str, tuple[str, str]] = {
    "granted": ("認証に成功しました。", "Authentication succeeded."),
    "granted_weak": (
        "認証に成功しました(カードIDのみの簡易認証です)。",
        "Authentication succeeded (card ID only, a weaker check).",
    ),
    "no_policy": (
        "利用ポリシーがないためログインできません。管理者に連絡してください。",
        "No access policy is available, so login is refused. Contact your administrator.",
    ),
    "policy_expired": (
        "利用ポリシーの有効期限が切れています。ネットワーク接続を確認し、管理者に連絡してください。",
        "The access policy has expired. Check the network connection and contact your administrator.",
    ),
    "unknown_user": _NOT_PERMITTED,
    "not_designated": _NOT_PERMITTED,
    "outside_hours": (
        "現在は利用時間外です。利用可能な時間帯にログインしてください。",
        "Login is not allowed at this time. Log in during the permitted hours.",
    ),
    "no_card": ("ICカードをリーダーに置いてください。", "Place your ID card on the reader."),
    "card_timeout": (
        "ICカードが時間内に応答しませんでした。カードを取り出し、置き直してもう一度お試しください。",
        "The card did not answer in time. Take it off the reader, place it again and retry.",
    ),
    "unknown_card": (
        "登録されていないICカードです。ご自身のICカードを置いてください。",
        "This card is not registered. Place your own ID card on the reader.",
    ),
    "card_bound_to_other": (
        "このICカードはこのアカウントに登録されていません。ご自身のICカードを置いてください。",
        "This card is not registered to this account. Place your own ID card on the reader.",
    ),
    "card_inactive": (
        "このICカードは利用停止中です。管理者に連絡してください。",
        "This card is suspended or revoked. Contact your administrator.",
    ),
    "card_auth_failed": (
        "ICカードを認証できませんでした。カードを置き直してもう一度お試しください。",
        "The card could not be authenticated. Place it on the reader again and retry.",
    ),
    "uid_only_not_allowed": (
        "このICカードの種類はログインに使えません。管理者に連絡してください。",
        "This kind of card may not be used for login. Contact your administrator.",
    ),
    "fingerprint_mismatch": (
        "指紋が一致しませんでした。指を置き直してもう一度お試しください。",
        "The fingerprint did not match. Place your finger again and retry.",
    ),
    "fingerprint_timeout": (
        "指紋の読み取りが時間切れになりました。センサーに指を置いてもう一度お試しください。",
        "Fingerprint reading timed out. Touch the sensor and retry.",
    ),
    "fingerprint_unavailable": (
        "指紋センサーを利用できません。管理者に連絡してください。",
        "The fingerprint sensor is unavailable. Contact your administrator.",
    ),
    "fingerprint_not_enrolled": (
        "指紋が登録されていません。管理者に登録を依頼してください。",
        "No fingerprint is enrolled for this account. Ask your administrator to enrol one.",
    ),
    "touch_sensor": ("指紋センサーに指を置いてください。", "Touch the fingerprint sensor."),
    "internal_error": (
        "内部エラーのためログインできません。管理者に連絡してください。",
        "Login failed because of an internal error. Contact your administrator.",
    ),
    "notice_heading": ("【本日のセキュリティ注意事項】", "[Today's security notice]"),
}


def message(reason: str, lang: Lang = "ja") -> str:
    """Return the user-facing text for a reason; unknown reasons read as an internal error (never blank)."""
    ja, en = MESSAGES.get(reason, MESSAGES["internal_error"])
    return ja if lang == "ja" else en


def bilingual(reason: str) -> str:
    """Return the text the PAM helper prints: the Japanese line, then the English line."""
    return f"{message(reason, 'ja')}\n{message(reason, 'en')}"
