#!/usr/bin/perl
# A small qmail-smtpd stand-in for the exec-backend benchmark: one SMTP
# session on stdin/stdout, every command accepted, messages thrown away.
# Perl rather than Python because it starts in about a millisecond, as a
# small C program such as qmail-smtpd does; the same program runs under
# tlsfront and under tcpserver.
use strict;
use warnings;

my $host = $ENV{TCPLOCALHOST} || 'sink.bench';
my %ok = map { $_ => 1 } qw(HELO MAIL RCPT RSET NOOP);
my ($buf, $data) = ('', 0);

sub reply { syswrite STDOUT, $_[0] }

reply "220 $host ESMTP\r\n";
while (1) {
    if ($data) {
        my $end = index $buf, "\r\n.\r\n";
        if ($end >= 0) {
            $buf = substr $buf, $end + 5;
            $data = 0;
            reply "250 ok\r\n";
            next;
        }
        $buf = substr $buf, -4 if length $buf > 4;
    } else {
        my $lf = index $buf, "\n";
        if ($lf >= 0) {
            my $line = substr $buf, 0, $lf + 1, '';
            my $verb = uc substr $line, 0, 4;
            if ($verb eq 'EHLO') {
                reply "250-$host\r\n250-PIPELINING\r\n250 8BITMIME\r\n";
            } elsif ($verb eq 'DATA') {
                reply "354 go ahead\r\n";
                ($data, $buf) = (1, "\r\n" . $buf);
            } elsif ($verb eq 'QUIT') {
                reply "221 $host\r\n";
                exit 0;
            } else {
                reply($ok{$verb} ? "250 ok\r\n" : "502 unimplemented\r\n");
            }
            next;
        }
    }
    my $n = sysread STDIN, $buf, 65536, length $buf;
    exit 0 unless $n;
}
