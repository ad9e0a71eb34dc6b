//! Dataset loaders on small files written by hand in each dataset's real
//! format (GroupLens CSVs with quoted titles, the JSONL manifest), good and
//! malformed: every bad input must be an error naming the file, the line
//! and the field.

use ragar_host::dataset::{Dataset, DatasetConfig, Format};
use std::path::Path;

const MOVIES: &str = "movieId,title,genres
1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy
11,\"American President, The (1995)\",Comedy|Drama|Romance
29,\"City of Lost Children, The (Cité des enfants perdus, La) (1995)\",Adventure|Drama|Fantasy|Mystery|Sci-Fi
50,\"Usual Suspects, The (1995)\",Crime|Mystery|Thriller
108583,,(no genres listed)
";

// User 1: five ratings >= 4 out of time order (plus one low); user 2: one
// rating >= 4 only (skipped); user 3: two (history 1 + reference).
const RATINGS: &str = "userId,movieId,rating,timestamp
1,50,4.5,1300
1,1,5.0,1000
1,11,3.0,1100
1,29,4.0,1200
1,108583,4.0,1250
1,11,4.0,1400
2,1,4.0,900
2,11,2.5,950
3,29,5.0,10
3,1,4.0,20
";

fn movielens(dir: &Path, movies: &str, ratings: &str) -> DatasetConfig {
    std::fs::write(dir.join("movies.csv"), movies).unwrap();
    std::fs::write(dir.join("ratings.csv"), ratings).unwrap();
    DatasetConfig {
        format: Format::Movielens,
        items: None,
        users: None,
        root: Some(dir.to_path_buf()),
        posters: "posters".into(),
        min_rating: 4.0,
        max_users: None,
        merged_users: 1000,
        history_len: 3,
        split_seed: 0,
        valid: 0.0,
        test: 0.0,
        holdout: Default::default(),
    }
}

fn load_err(cfg: &DatasetConfig) -> String {
    Dataset::load(cfg, Path::new("."), Path::new("."))
        .unwrap_err()
        .to_string()
}

#[test]
fn movielens_sequences_items_and_posters() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = movielens(dir.path(), MOVIES, RATINGS);
    std::fs::create_dir(dir.path().join("posters")).unwrap();
    image::RgbImage::new(4, 6)
        .save(dir.path().join("posters/1.png"))
        .unwrap();
    std::fs::write(dir.path().join("posters/50.JPG"), b"not decoded at load").unwrap();
    let d = Dataset::load(&cfg, Path::new("."), Path::new(".")).unwrap();

    assert_eq!(d.item_order, ["1", "11", "29", "50", "108583"]);
    assert_eq!(
        d.items["11"].text,
        "American President, The (1995). Genres: Comedy, Drama, Romance"
    );
    assert_eq!(d.items["108583"].text, "");
    assert_eq!(
        d.items["1"].image.as_deref(),
        Some(dir.path().join("posters/1.png").as_path())
    );
    assert!(d.items["50"].image.is_some());
    assert!(d.items["29"].image.is_none());
    assert!(
        d.notes.iter().any(|n| n.contains("3 of 5 movies have no poster")),
        "{:?}",
        d.notes
    );
    assert!(
        d.notes.iter().any(|n| n.contains("1 users have fewer than two")),
        "{:?}",
        d.notes
    );

    // Ratings >= 4 by time: user 1 = 1 (t1000), 29 (1200), 108583 (1250), 50 (1300), 11 (1400).
    let ids: Vec<&str> = d.users.iter().map(|u| u.user.as_str()).collect();
    assert_eq!(ids, ["1", "3"]);
    assert_eq!(d.sequences[0], ["1", "29", "108583", "50", "11"]);
    assert_eq!(d.users[0].reference.as_deref(), Some("11"));
    assert_eq!(
        d.users[0].history,
        ["29", "108583", "50"],
        "the last history_len = 3 items"
    );
    assert_eq!(d.sequences[1], ["29", "1"]);
    assert_eq!(d.users[1].history, ["29"]);
}

#[test]
fn movielens_without_posters_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let d = Dataset::load(&movielens(dir.path(), MOVIES, RATINGS), Path::new("."), Path::new(".")).unwrap();
    assert!(d.items.values().all(|i| i.image.is_none()));
    assert!(d.notes.iter().any(|n| n.contains("no posters folder")), "{:?}", d.notes);
    assert!(d
        .image_path("1")
        .unwrap_err()
        .to_string()
        .contains("item '1' has no image"));
}

#[test]
fn movielens_bad_rows_name_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let bad_rating = RATINGS.replace("1,29,4.0,1200", "1,29,four,1200");
    let e = load_err(&movielens(p, MOVIES, &bad_rating));
    assert!(
        e.contains("ratings.csv:5") && e.contains("'rating'") && e.contains("'four'"),
        "{e}"
    );

    let out_of_range = RATINGS.replace("3,1,4.0,20", "3,1,7.5,20");
    let e = load_err(&movielens(p, MOVIES, &out_of_range));
    assert!(e.contains("ratings.csv:11") && e.contains("outside 0.5-5.0"), "{e}");

    let unknown = RATINGS.replace("2,11,2.5,950", "2,999,2.5,950");
    let e = load_err(&movielens(p, MOVIES, &unknown));
    assert!(
        e.contains("ratings.csv:9") && e.contains("movieId 999 is not in"),
        "{e}"
    );

    let short = RATINGS.replace("1,50,4.5,1300", "1,50");
    let e = load_err(&movielens(p, MOVIES, &short));
    assert!(e.contains("ratings.csv:2"), "{e}");

    let dup = format!("{MOVIES}11,Again (2000),Drama\n");
    let e = load_err(&movielens(p, &dup, RATINGS));
    assert!(
        e.contains("movies.csv:7") && e.contains("movieId 11 appears twice") && e.contains("line 3"),
        "{e}"
    );

    let e = load_err(&movielens(
        p,
        MOVIES,
        &RATINGS.replace("userId,movieId", "user,movieId"),
    ));
    assert!(
        e.contains("no 'userId' column") && e.contains("found user,movieId"),
        "{e}"
    );

    let e = load_err(&movielens(p, MOVIES, "userId,movieId,rating,timestamp\n1,1,3.0,5\n"));
    assert!(e.contains("no user has two or more ratings >= 4"), "{e}");

    let mut missing = movielens(p, MOVIES, RATINGS);
    missing.root = None;
    assert!(load_err(&missing).contains("dataset.root is required for dataset.format: \"movielens\""));
}

fn manifest(dir: &Path, items: &str, users: &str) -> DatasetConfig {
    std::fs::write(dir.join("items.jsonl"), items).unwrap();
    std::fs::write(dir.join("users.jsonl"), users).unwrap();
    DatasetConfig {
        format: Format::Jsonl,
        items: Some(dir.join("items.jsonl")),
        users: Some(dir.join("users.jsonl")),
        root: None,
        posters: "posters".into(),
        min_rating: 4.0,
        max_users: None,
        merged_users: 1000,
        history_len: 20,
        split_seed: 0,
        valid: 0.0,
        test: 0.0,
        holdout: Default::default(),
    }
}

#[test]
fn manifest_refuses_escaping_paths_duplicates_and_empty_users() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let items = "{\"id\": \"a\", \"image\": \"img/a.png\", \"text\": \"A\"}\n{\"id\": \"b\", \"image\": \"b.png\"}\n";
    let users = "{\"user\": \"u\", \"history\": [\"a\"], \"reference\": \"b\"}\n";
    let d = Dataset::load(&manifest(p, items, users), Path::new("."), Path::new(".")).unwrap();
    assert_eq!(d.items["a"].image.as_deref(), Some(p.join("img/a.png").as_path()));
    assert_eq!(d.sequences[0], ["a", "b"]);

    let escaping = items.replace("img/a.png", "../../etc/a.png");
    let e = load_err(&manifest(p, &escaping, users));
    assert!(
        e.contains("items.jsonl:1") && e.contains("leaves the dataset folder"),
        "{e}"
    );
    let absolute = items.replace("img/a.png", "/etc/a.png");
    assert!(load_err(&manifest(p, &absolute, users)).contains("is absolute"));

    let dup = format!("{items}{{\"id\": \"a\", \"image\": \"c.png\"}}\n");
    let e = load_err(&manifest(p, &dup, users));
    assert!(
        e.contains("items.jsonl:3") && e.contains("item 'a': appears twice"),
        "{e}"
    );

    let dup_user = format!("{users}{users}");
    assert!(load_err(&manifest(p, items, &dup_user)).contains("users.jsonl:2: user 'u': appears twice"));

    let empty = "{\"user\": \"v\", \"history\": []}\n";
    let e = load_err(&manifest(p, items, empty));
    assert!(
        e.contains("users.jsonl:1: user 'v'") && e.contains("at least one history item"),
        "{e}"
    );

    let unknown = "{\"user\": \"w\", \"history\": [\"a\", \"zz\"]}\n";
    assert!(load_err(&manifest(p, items, unknown)).contains("item 'zz' is not in"));

    let bad_json = "{\"user\": \"w\", \"history\": [\"a\"]\n";
    assert!(load_err(&manifest(p, items, bad_json)).contains("users.jsonl:1"));
}

fn from_json(v: serde_json::Value) -> DatasetConfig {
    serde_json::from_value(v).unwrap()
}

const POG_ITEMS: &str = "i1,c1,http://img/1.jpg,red floral summer dress
i2,c2,http://img/2.jpg,white canvas sneakers, low top
i3,c1,http://img/3.jpg,black slim jeans
i4,c3,http://img/4.jpg,straw hat
";
const POG_OUTFITS: &str = "o1,i1;i2\no2,i3;i4\n";
const POG_USERS: &str = "u1,i1;i3;i1;i2,o1
u2,i4,o2
u1,i4,o2
u3,i2;i4,o1
";

fn pog(dir: &Path, items: &str, users: &str) -> DatasetConfig {
    std::fs::write(dir.join("item_data.txt"), items).unwrap();
    std::fs::write(dir.join("outfit_data.txt"), POG_OUTFITS).unwrap();
    std::fs::write(dir.join("user_data.txt"), users).unwrap();
    from_json(serde_json::json!({"format": "pog", "root": dir}))
}

#[test]
fn pog_users_items_and_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::create_dir(p.join("images")).unwrap();
    std::fs::write(p.join("images/i2.jpg"), b"x").unwrap();
    let d = Dataset::load(&pog(p, POG_ITEMS, POG_USERS), Path::new("."), Path::new(".")).unwrap();
    assert_eq!(
        d.items["i2"].text, "white canvas sneakers, low top",
        "titles keep their commas"
    );
    assert!(d.items["i2"].image.is_some() && d.items["i1"].image.is_none());
    // u1's two lines joined, repeats dropped; u2 has one item and is skipped.
    let ids: Vec<&str> = d.users.iter().map(|u| u.user.as_str()).collect();
    assert_eq!(ids, ["u1", "u3"]);
    assert_eq!(d.sequences[0], ["i1", "i3", "i2", "i4"]);
    assert_eq!(d.users[0].reference.as_deref(), Some("i4"));
    assert!(
        d.notes.iter().any(|n| n.contains("1 users with a single item")),
        "{:?}",
        d.notes
    );

    let e = load_err(&pog(p, POG_ITEMS, &POG_USERS.replace("u2,i4,o2", "u2,i9,o2")));
    assert!(e.contains("user_data.txt:2") && e.contains("item i9 is not in"), "{e}");
    let e = load_err(&pog(p, POG_ITEMS, &POG_USERS.replace("u2,i4,o2", "u2,,o2")));
    assert!(e.contains("user_data.txt:2: user u2 has no items"), "{e}");
    let e = load_err(&pog(p, POG_ITEMS, &POG_USERS.replace("u2,i4,o2", "u2;i4")));
    assert!(e.contains("user_data.txt:2: expected user_id"), "{e}");
    let e = load_err(&pog(p, POG_ITEMS, &POG_USERS.replace("u2,i4,o2", "u2,i4,o7")));
    assert!(e.contains("outfit o7 is not in"), "{e}");
    let e = load_err(&pog(p, &format!("{POG_ITEMS}i3,c9,u,again\n"), POG_USERS));
    assert!(
        e.contains("item_data.txt:5: item i3 appears twice (first on line 3)"),
        "{e}"
    );

    let mut sub = pog(p, POG_ITEMS, POG_USERS);
    sub.max_users = Some(1);
    let d = Dataset::load(&sub, Path::new("."), Path::new(".")).unwrap();
    assert!(d.users.len() <= 1 && d.notes.iter().any(|n| n.contains("1 of 3 users drawn")));
}

fn ser30k(dir: &Path, themes: &[(&str, usize)]) -> DatasetConfig {
    let mut ann = Vec::new();
    for (t, n) in themes {
        std::fs::create_dir_all(dir.join("Images").join(t)).unwrap();
        for i in 0..*n {
            let f = format!("{t}_{i}.png");
            image::RgbImage::new(2, 2)
                .save(dir.join("Images").join(t).join(&f))
                .unwrap();
            ann.push(serde_json::json!({"topic": t, "file_name": f, "anno": 1 + i % 7, "text": if i == 0 { "hi!" } else { "" }}));
        }
    }
    std::fs::create_dir_all(dir.join("Annotations/image-level")).unwrap();
    let half = ann.len() / 2;
    for (part, a) in [("train", &ann[..half]), ("test", &ann[half..])] {
        std::fs::write(
            dir.join(format!("Annotations/image-level/{part}.json")),
            serde_json::json!({"annotations": a}).to_string(),
        )
        .unwrap();
    }
    let mut c = from_json(serde_json::json!({"format": "ser30k", "root": dir, "merged_users": 50}));
    c.history_len = 5;
    c
}

#[test]
fn ser30k_merges_two_themes_and_takes_the_reference_from_a_third() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let cfg = ser30k(p, &[("cat", 6), ("dog", 4), ("bear", 8), ("frog", 3)]);
    let d = Dataset::load(&cfg, Path::new("."), Path::new(".")).unwrap();
    assert_eq!(d.items.len(), 21);
    assert_eq!(d.items["cat/cat_0.png"].text, "hi!");
    assert_eq!(d.items["cat/cat_1.png"].text, "cat", "no text: the theme's name");
    assert_eq!(d.users.len(), 50);
    let theme = |id: &str| id.split('/').next().unwrap().to_string();
    for u in &d.users {
        let hist: std::collections::HashSet<String> = u.history.iter().map(|i| theme(i)).collect();
        assert!(hist.len() <= 2 && !hist.is_empty(), "{u:?}");
        assert!(!hist.contains(&theme(u.reference.as_deref().unwrap())), "{u:?}");
        let distinct: std::collections::HashSet<&String> = u.history.iter().collect();
        assert_eq!(distinct.len(), u.history.len(), "drawn without replacement: {u:?}");
        assert!(u.history.len() == 5 || u.history.len() < 5 && hist.len() == 2, "{u:?}");
    }
    // Seeded: the same users again.
    let again = Dataset::load(&cfg, Path::new("."), Path::new(".")).unwrap();
    assert_eq!(again.users, d.users);

    let two = ser30k(&p.join("two"), &[("cat", 3), ("dog", 3)]);
    assert!(load_err(&two).contains("2 themes; merged users need at least three"));
    let escape = p.join("esc");
    let mut c = ser30k(&escape, &[("a", 1), ("b", 1), ("c", 1)]);
    std::fs::write(
        escape.join("Annotations/image-level/val.json"),
        r#"{"annotations": [{"topic": "../../x", "file_name": "y.png"}]}"#,
    )
    .unwrap();
    let e = load_err(&c);
    assert!(
        e.contains("val.json: annotations[0]") && e.contains("leaves the dataset folder"),
        "{e}"
    );
    std::fs::write(
        escape.join("Annotations/image-level/val.json"),
        r#"{"annotations": [{"topic": "a"}]}"#,
    )
    .unwrap();
    c.merged_users = 1;
    assert!(load_err(&c).contains("val.json:1"));
}

#[test]
fn the_open_sticker_set_loads_as_ser30k() {
    let cache = std::env::var_os("RAGAR_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ragar"));
    let root = cache.join("data/stickers");
    assert!(
        root.join("ATTRIBUTION.md").is_file(),
        "{} missing: run scripts/setup.sh",
        root.display()
    );
    let cfg = from_json(serde_json::json!({"format": "ser30k", "root": root, "merged_users": 200}));
    let d = Dataset::load(&cfg, Path::new("."), Path::new(".")).unwrap();
    assert_eq!(d.items.len(), 1368);
    assert_eq!(d.users.len(), 200);
    assert!(d.users.iter().all(|u| u.history.len() == 20));
    assert_eq!(d.items["food/1F355.png"].text.split('.').next(), Some("slice of pizza"));
    for id in &d.item_order {
        let img = ragar_core::vision::decode(d.image_path(id).unwrap()).unwrap().image;
        assert_eq!((img.width, img.height), (64, 64), "{id}");
    }
}
