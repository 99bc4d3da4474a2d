"""Bulk work: 10,000 rows in a few statements. The SQL is written here and by the dialect rather
than built value by value by the query builder (measured: building it cost 7 us a value, more
than the database spent storing the rows: 15 s per 150k results)."""
from itertools import islice

from bouncer.store.database import database, dialect

CHUNK = 10000   # ids in one IN list (each list is one parameter, see `among`)


def among(field, values):
    """`field IN values` as one bound parameter (see the dialects' `among`)."""
    return dialect().among(field, values)


def looked_up(field, values):
    """`field IN values`, found by one probe of the index of `field` per value (see the
    dialects' `looked_up`): for many values against a large table."""
    return dialect().looked_up(field, values)


def chunked(iterable, size=CHUNK):
    iterator = iter(iterable)
    while True:
        chunk = list(islice(iterator, size))
        if not chunk:
            return
        yield chunk


def bulk_insert(model, rows, replace_on=None, ignore_existing=False):
    """Insert dict rows (all with the same keys, plain values); see insert_tuples."""
    if rows:
        names = list(rows[0])
        insert_tuples(model, names, [tuple(row[n] for n in names) for row in rows],
                      replace_on=replace_on, ignore_existing=ignore_existing)


def insert_tuples(model, names, rows, replace_on=None, ignore_existing=False):
    """Insert rows (tuples of plain values for the fields `names`) in as few statements as the
    database allows; fields left out take their model default. With `replace_on` (the key
    field), a row whose key exists replaces it whole; with `ignore_existing`, it is skipped."""
    if not rows:
        return
    defaults = {name: field.default for name, field in model._meta.fields.items()
                if name not in names and field.default is not None and not callable(field.default)}
    columns = column_names(model, names) + column_names(model, defaults)
    fixed = tuple(defaults.values())
    if fixed:
        rows = [row + fixed for row in rows]
    dialect().insert_rows(database, model._meta.table_name, columns, rows,
                          conflict_clause(columns, replace_on, ignore_existing))


def insert_encoded(model, names, prefixed, encoded, tail_values, replace_on=None):
    """Insert rows made of a key, a row encoded by the dialect (`dialect().encode_rows`, in the
    process that read them) and `tail_values`, one for each `(key, index)` of `prefixed`; every
    field of the model is among `names`."""
    columns = column_names(model, names)
    dialect().insert_encoded(database, model._meta.table_name, columns, prefixed, encoded, tail_values,
                             conflict_clause(columns, replace_on))


def column_names(model, names):
    return [model._meta.fields[name].column_name for name in names]


def conflict_clause(columns, replace_on=None, ignore_existing=False):
    if replace_on is not None:
        key = replace_on.column_name
        return ' ON CONFLICT ("%s") DO UPDATE SET %s' % (key, ", ".join(
            '"%s" = excluded."%s"' % (c, c) for c in columns if c != key))
    return " ON CONFLICT DO NOTHING" if ignore_existing else ""
