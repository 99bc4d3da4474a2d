"""Reading submitted addresses: a text file (one a line), a CSV with an `email` column, or the
JSON body of the HTTP API.

Streams: a million rows are never held in memory. Yields `(line_number, text)`, with
`line_number` the 1-based physical line of the input (for JSON, the 1-based index in
`emails`), for messages that point at the problem.
"""

import codecs
import csv
import json
import sys

from bouncer.errors import InputError, MalformedInput

EMAIL_COLUMN = "email"
# Delimiters a header row is tried with: Excel writes ';' in many locales, and '\t' for TSV.
DELIMITERS = (",", ";", "\t")
JSON_FIELDS = ("user_id", "check_type", "callback_url")


MAX_ECHO = 80


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
    """Yield (line_number, address_text) for every non-blank row of `path`: a CSV when its first
    row is a header, plain lines otherwise."""
    name = "<stdin>" if path == "-" else path
    stream = open_source(path)
    try:
        yield from read_stream(name, stream)
    finally:
        if path != "-":
            stream.close()


def read_stream(name, stream, form="auto"):
    """(line, text) of every non-blank row of a binary `stream`. `form`: "text" (one address a
    line), "csv" (a header with an `email` column), or "auto" (a CSV when the first row is a
    header)."""
    lines = decoded_lines(name, stream)
    for number, line in lines:
        if not line.strip():
            continue
        header = csv_header(line) if form != "text" else None
        if header is not None:
            yield from read_csv_column(name, number, header, lines)
        elif form == "csv":
            raise InputError("%s: line %d: a CSV needs a header row with an `email` column (found %r)"
                             % (name, number, echo(line.strip())))
        else:
            yield number, line.strip()
            yield from read_text_lines(lines)
        return


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


def csv_header(line):
    """(delimiter, cells) when `line` is a CSV header: several cells with one of DELIMITERS, or
    the single cell `email`; None for a plain line."""
    for delimiter in DELIMITERS:
        cells = parse_csv_line(line, delimiter)
        if len(cells) > 1 or (len(cells) == 1 and cells[0].strip().lower() == EMAIL_COLUMN):
            return delimiter, cells
    return None


def read_text_lines(lines):
    # A plain text row is the whole line, so a stray comma or quote stays in the address and the
    # syntax check, not the parser, reports it.
    for number, line in lines:
        text = line.strip()
        if text:
            yield number, text


def read_csv_column(name, header_line, header, lines):
    delimiter, cells = header
    names = [cell.strip().lower() for cell in cells]
    if EMAIL_COLUMN not in names:
        raise InputError("%s: line %s: the CSV header has no `email` column (it has: %s)"
                         % (name, header_line, echo(", ".join(cells))))
    column = names.index(EMAIL_COLUMN)
    numbers = []

    def numbered(source):
        for number, line in source:
            numbers.append(number)
            yield line

    rows = csv.reader(numbered(lines), delimiter=delimiter, strict=True)
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


def parse_csv_line(line, delimiter=","):
    try:
        return next(csv.reader([line], delimiter=delimiter), [])
    except csv.Error:
        return [line]


def echo(text):
    return text if len(text) <= MAX_ECHO else text[:MAX_ECHO] + "..."


class JsonBatch:
    """`{"user_id", "check_type", "emails": [...], "callback_url"?}` read as a stream (ijson):
    `fields` fills as the parser meets them; `emails()` yields (index, text). Emails that come
    before the fields a loader needs are kept in a spool file, never in memory.

    The body's form is known, so it is checked event by event, from ijson's basic events (no
    path is built per level): an unknown or repeated field, or a value nested where the form has
    none, is refused at its first event. However deep a body was written, it is read at most two
    levels down (the object, its list of emails): a body nested 100,000 deep costs what its
    first few brackets cost."""

    def __init__(self, stream):
        import ijson
        self.ijson = ijson
        self.fields = {}
        self.seen = set()
        self.count = 0
        self.spool = None
        self.held = None
        self.parsed = self.parse(ijson.basic_parse(stream, use_float=True))

    def fields_ready(self):
        return "user_id" in self.fields and "check_type" in self.fields

    def read_fields(self):
        """Read on until the fields a loader needs are known (emails met on the way are spooled)
        or the body ends; the first email after them is held back for `emails()`."""
        for item in self.parsed:
            if item is None:
                if self.fields_ready():
                    return
            elif self.fields_ready():
                self.held = item
                return
            else:
                self.spool_email(item)

    def emails(self):
        """Every email, in order: those spooled, the one held back, then the rest of the body."""
        if self.spool is not None:
            self.spool.seek(0)
            for index, line in enumerate(self.spool, start=1):
                yield index, json.loads(line)
            self.spool.close()
            self.spool = None
        if self.held is not None:
            yield self.held
            self.held = None
        for item in self.parsed:
            if item is not None:
                yield item

    def finish(self):
        """Read the rest of the body (fields after the emails), checking it is valid JSON."""
        for _ in self.parsed:
            pass

    def parse(self, events):
        """Yields each email as (index, text), and None after each field."""
        try:
            if next(events, (None, None))[0] != "start_map":
                raise MalformedInput(BODY_FORM)
            for event, key in events:
                if event == "end_map":
                    break
                self.check_field(key)
                if key == "emails":
                    yield from self.parse_emails(events)
                else:
                    self.fields[key] = scalar(key, *next(events, (None, None)))
                    yield None
            for _ in events:     # anything after the object: ijson refuses it
                pass
        except self.ijson.JSONError as exc:
            raise MalformedInput("the body is not valid JSON: %s" % one_line(exc)) from None

    def check_field(self, key):
        if key not in JSON_FIELDS and key != "emails":
            raise MalformedInput("unknown field %r: %s" % (echo(key), BODY_FORM))
        if key in self.seen:
            raise MalformedInput("the body has %s twice" % key)
        self.seen.add(key)

    def parse_emails(self, events):
        if next(events, (None, None))[0] != "start_array":
            raise MalformedInput("emails must be a list of addresses")
        for event, value in events:
            if event == "end_array":
                return
            if event != "string":
                raise MalformedInput("emails: item %d is not a string" % (self.count + 1))
            self.count += 1
            yield self.count, value

    def spool_email(self, item):
        if self.spool is None:
            import tempfile
            self.spool = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        self.spool.write(json.dumps(item[1]) + "\n")


BODY_FORM = "the body must be a JSON object with user_id, check_type, emails and, optionally, callback_url"
SCALARS = ("string", "number", "boolean", "null")


def scalar(key, event, value):
    """A field's value; a list or an object where the form wants a string is refused at once."""
    if event not in SCALARS:
        raise InputError("%s must be a string" % key)
    return value


def one_line(exc):
    return " ".join(str(exc).split())[:200]

