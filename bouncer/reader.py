"""Reading submitted addresses: a text file (one a line) or a CSV with an `email` column.

Streams: a million-line file is never held in memory. Yields `(line_number, text)`, with
`line_number` the 1-based physical line in the file, for messages that point at the problem.
"""
import codecs
import csv
import sys

from .errors import InputError

EMAIL_COLUMN = "email"


def open_source(path):
    """A binary stream for `path` ('-' for stdin); lines are decoded one by one, so that an
    encoding error can name its line."""
    if path == "-":
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise InputError("%s: no such file" % path) from None
    except IsADirectoryError:
        raise InputError("%s: is a directory, not a file of addresses" % path) from None
    except OSError as exc:
        raise InputError("%s: cannot be read: %s" % (path, exc.strerror or exc)) from None


def read_addresses(path):
    """Yield (line_number, address_text) for every non-blank row of `path`."""
    name = "<stdin>" if path == "-" else path
    stream = open_source(path)
    lines = decoded_lines(name, stream)
    try:
        for number, line in lines:
            if not line.strip():
                continue
            first = parse_csv_line(name, number, line)
            if is_header(first):
                yield from read_csv_column(name, number, first, lines)
            else:
                yield number, line.strip()
                yield from read_text_lines(lines)
            return
    finally:
        if path != "-":
            stream.close()


def decoded_lines(name, stream):
    """(line number, text) of each line: UTF-8 with or without BOM, LF or CRLF."""
    for number, raw in enumerate(stream, start=1):
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError("%s: line %d: is not UTF-8 text (save the file as UTF-8 and submit "
                             "again)" % (name, number)) from None


def is_header(cells):
    """A first row with several cells, or the single cell `email`, is a CSV header."""
    return len(cells) > 1 or (len(cells) == 1 and cells[0].strip().lower() == EMAIL_COLUMN)


def read_text_lines(lines):
    # A plain text row is the whole line, so a stray comma or quote stays in the address and the
    # syntax check, not the parser, reports it.
    for number, line in lines:
        text = line.strip()
        if text:
            yield number, text


def read_csv_column(name, header_line, header, lines):
    names = [cell.strip().lower() for cell in header]
    if EMAIL_COLUMN not in names:
        raise InputError("%s: line %s: the CSV header has no `email` column (it has: %s)"
                         % (name, header_line, ", ".join(header)))
    column = names.index(EMAIL_COLUMN)
    numbers = []

    def numbered(source):
        for number, line in source:
            numbers.append(number)
            yield line

    rows = csv.reader(numbered(lines), strict=True)
    try:
        for cells in rows:
            number = numbers[0]
            numbers.clear()
            if not any(cell.strip() for cell in cells):
                continue
            yield number, cells[column].strip() if column < len(cells) else ""
    except csv.Error as exc:
        raise InputError("%s: line %s: cannot parse CSV: %s"
                         % (name, numbers[0] if numbers else "?", exc)) from None


def parse_csv_line(name, number, line):
    try:
        return next(csv.reader([line]), [])
    except csv.Error:
        return [line]
