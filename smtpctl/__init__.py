"""pysmtpd: smtpctl."""
