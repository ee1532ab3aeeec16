"""Every reply of SMTP AUTH, in one place (RFC 4954 and RFC 3463 codes).

The dialogue sends these as they are; the texts never contain a user name
or anything the client sent, so a reply cannot echo a password back.
"""

from __future__ import annotations

from tlsfront.smtp.reply import Reply

SUCCEEDED = Reply.make(235, "2.7.0 Authentication successful")
# The client sent `*`: RFC 4954 section 4 asks for a 501.
CANCELLED = Reply.make(501, "5.7.0 Authentication cancelled")
BAD_BASE64 = Reply.make(501, "5.5.2 Cannot decode the response")
MALFORMED = Reply.make(501, "5.5.2 Malformed authentication response")
SYNTAX = Reply.make(501, "5.5.4 Syntax: AUTH mechanism [initial-response]")
UNKNOWN_MECHANISM = Reply.make(504, "5.5.4 Unrecognized authentication type")
LINE_TOO_LONG = Reply.make(500, "5.5.6 Authentication Exchange line is too long")
INVALID = Reply.make(535, "5.7.8 Authentication credentials invalid")
TEMPFAIL = Reply.make(454, "4.7.0 Temporary authentication failure")
# For the dialogue (RFC 4954 section 4 and 6):
ALREADY = Reply.make(503, "5.5.1 Already authenticated")
IN_TRANSACTION = Reply.make(503, "5.5.1 AUTH not permitted during a mail transaction")
STARTTLS_FIRST = Reply.make(530, "5.7.0 Must issue a STARTTLS command first")
REQUIRED = Reply.make(530, "5.7.0 Authentication required")
TOO_MANY_FAILURES = Reply.make(421, "4.7.0 Too many failed authentication attempts")
