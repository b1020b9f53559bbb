# bash completion for smtpctl: PLACEHOLDER (the generated file replaces it at merge).
complete -F _longopt smtpctl 2>/dev/null || true
