"""What both shells share below SMTP: a lean trio stream over a socket (``netstream``) and the
edge-triggered readiness hub behind it (``readiness``). Nothing here parses SMTP."""
