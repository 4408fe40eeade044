"""Door registers: key loans (鍵貸出管理簿), the door and locker log, who is inside each area, the visitor log."""
