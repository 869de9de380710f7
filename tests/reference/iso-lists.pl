#!/usr/bin/perl
# ISO listings for the reference pipeline, with the libraries Tails uses
# (libcdio through Device::Cdio, YAML::XS):
#   iso-lists.pl control-yml OLD.iso NEW.iso   prints control.yml
#   iso-lists.pl kernels OLD.iso NEW.iso       prints changed/new live/ kernels, one per line
use strict;
use warnings;
use Device::Cdio::ISO9660;
use Device::Cdio::ISO9660::IFS;
use File::Basename;
use YAML::XS;

my ($mode, $old, $new) = @ARGV;
die "usage: $0 control-yml|kernels OLD NEW\n" unless $mode && $old && $new;

sub names {
    my ($iso, $dir) = @_;
    my $ifs = Device::Cdio::ISO9660::IFS->new(-source => $iso);
    my @entries = eval { $ifs->readdir($dir) };
    my %n;
    for (@entries) {
        my $t = Device::Cdio::ISO9660::name_translate($_->{filename});
        $n{basename $t} = 1;
    }
    delete $n{$_} for ('', '.', '..');
    return %n;
}

if ($mode eq 'control-yml') {
    my @delete;
    for my $dir ('EFI', 'EFI/BOOT', 'EFI/BOOT/grub', 'EFI/BOOT/grub/i386-efi',
                 'EFI/BOOT/grub/x86_64-efi', 'EFI/debian', 'EFI/debian/grub',
                 'EFI/debian/grub/i386-efi', 'EFI/debian/grub/x86_64-efi',
                 qw{isolinux live syslinux tails utils utils/mbr utils/linux}) {
        my %o = names($old, $dir);
        my %n = names($new, $dir);
        for my $f (sort keys %o) {
            push @delete, "$dir/$f" unless $n{$f};
        }
    }
    print Dump({ delete_files => \@delete });
} elsif ($mode eq 'kernels') {
    my $want = sub { $_[0] =~ m{^vmlinuz[0-9]*$} || $_[0] =~ m{^initrd[0-9]*[.]img$} };
    my %o = names($old, 'live');
    my %n = names($new, 'live');
    for my $f (sort grep { $want->($_) } keys %n) {
        if (!$o{$f}) { print "$f\n"; next }
        my $a = `bsdtar -x --to-stdout --fast-read -f '$old' 'live/$f'`;
        my $b = `bsdtar -x --to-stdout --fast-read -f '$new' 'live/$f'`;
        print "$f\n" if $a ne $b;
    }
} else {
    die "unknown mode $mode\n";
}
