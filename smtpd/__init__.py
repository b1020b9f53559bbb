"""pysmtpd: smtpd."""
