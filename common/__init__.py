"""pysmtpd: common."""
